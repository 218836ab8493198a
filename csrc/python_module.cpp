// Makes `from effkernels import _C` load the library, which runs the TORCH_LIBRARY registrars.
// No pybind: the ops are reached through torch.ops.effkernels.* only. Built by setup.py alone
// (the CMake library is for C++ users and has no Python entry point).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "effkernels operator library",
                                   -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef EFFK_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
