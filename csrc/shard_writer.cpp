#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_shard_writer(py::module_& m) {}
