// card_megatron._indexer: the C++ data indexer (pybind11).
//   shard_writer.cpp  streaming writer of Megatron MMIDIDX .bin/.idx token shards
//   sample_index.cpp  document/sample/shuffle indices, blending, precomputed noise seeds
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_shard_writer(py::module_& m);
void register_sample_index(py::module_& m);

PYBIND11_MODULE(_indexer, m) {
  m.doc() = "card_megatron C++ data indexer";
  m.attr("ABI_VERSION") = 1;
  register_shard_writer(m);
  register_sample_index(m);
}
