// C++ data indexer for card_megatron (pybind11 module card_megatron._indexer).
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_indexer, m) {
  m.doc() = "card_megatron C++ data indexer";
  m.attr("ABI_VERSION") = 1;
}
