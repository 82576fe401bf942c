// Makes attnkern._C importable as a Python module; importing it runs the TORCH_LIBRARY
// registrations, which is all the Python side needs (no pybind11 bindings).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
