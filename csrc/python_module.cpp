// Lets `import sparsekern._C` load the library (and so run the TORCH_LIBRARY
// registrations) without binding any Python functions: the ops are reached through
// torch.ops.sparsekern. Not built by CMakeLists.txt (LibTorch users have no Python).
#ifdef SPARSEKERN_PYTHON_MODULE
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif
