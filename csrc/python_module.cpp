// Makes `from effkernels import _C` load the library, which runs the TORCH_LIBRARY registrars.
// No pybind: the ops are reached through torch.ops.effkernels.* only; the Python functions here
// are the chained replay's check (effkernels.nn.blocks._State.unchanged) and the CPU kernels'
// instruction set (effkernels.cpu_isa). Built by setup.py
// alone (the CMake library is for C++ users and has no Python entry point).
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include "cpu/cpu_gemm.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(effkernels::cpu::isa_name(effkernels::cpu::cpu_isa()));
}

// unchanged(same_in, same_key, same_obj, set_obj, set_attr, set_value, tensors, versions,
//           sized, sizes):
//   all(same_in[i].get(same_key[i]) is same_obj[i])
//   and [getattr(o, a) for o, a in zip(set_obj, set_attr)] == set_value
//   and [t._version for t in tensors] == versions
//   and [len(o) for o in sized] == sizes
// (lists of equal lengths per group; errors as the Python expressions raise them). A prepacked
// model's replay checks ~900 such entries per batch-1 forward; after a forward has streamed
// the model's weights through the caches, the Python expressions took ~320 us
// (mobilenetv3_large_100, ~6% of the forward), one dependent cache miss after another; a tight
// loop lets the CPU overlap the misses of neighbouring entries.
PyObject* unchanged(PyObject*, PyObject* args) {
  PyObject *same_in, *same_key, *same_obj, *set_obj, *set_attr, *set_value, *tensors, *versions,
      *sized, *sizes;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!O!O!O!O!:unchanged", &PyList_Type, &same_in,
                        &PyList_Type, &same_key, &PyList_Type, &same_obj, &PyList_Type, &set_obj,
                        &PyList_Type, &set_attr, &PyList_Type, &set_value, &PyList_Type,
                        &tensors, &PyList_Type, &versions, &PyList_Type, &sized, &PyList_Type,
                        &sizes))
    return nullptr;
  const Py_ssize_t ns = PyList_GET_SIZE(same_in), nv = PyList_GET_SIZE(set_obj),
                   nt = PyList_GET_SIZE(tensors), nz = PyList_GET_SIZE(sized);
  if (PyList_GET_SIZE(same_key) != ns || PyList_GET_SIZE(same_obj) != ns ||
      PyList_GET_SIZE(set_attr) != nv || PyList_GET_SIZE(set_value) != nv ||
      PyList_GET_SIZE(versions) != nt || PyList_GET_SIZE(sizes) != nz) {
    PyErr_SetString(PyExc_ValueError, "unchanged: the lists of a group differ in length");
    return nullptr;
  }
  // The objects first, all at once (independent misses overlap), then the dependent loads.
  for (Py_ssize_t i = 0; i < ns; ++i) __builtin_prefetch(PyList_GET_ITEM(same_in, i));
  for (Py_ssize_t i = 0; i < nt; ++i) __builtin_prefetch(PyList_GET_ITEM(tensors, i));
  for (Py_ssize_t i = 0; i < nv; ++i) __builtin_prefetch(PyList_GET_ITEM(set_obj, i));
  for (Py_ssize_t i = 0; i < ns; ++i) {
    PyObject* d = PyList_GET_ITEM(same_in, i);
    if (!PyDict_Check(d)) {
      PyErr_SetString(PyExc_TypeError, "unchanged: same_in must hold dicts");
      return nullptr;
    }
    PyObject* v = PyDict_GetItemWithError(d, PyList_GET_ITEM(same_key, i));  // borrowed
    if (v == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      v = Py_None;
    }
    if (v != PyList_GET_ITEM(same_obj, i)) Py_RETURN_FALSE;
  }
  for (Py_ssize_t i = 0; i < nv; ++i) {
    PyObject* v = PyObject_GetAttr(PyList_GET_ITEM(set_obj, i), PyList_GET_ITEM(set_attr, i));
    if (v == nullptr) return nullptr;
    const int eq = PyObject_RichCompareBool(v, PyList_GET_ITEM(set_value, i), Py_EQ);
    Py_DECREF(v);
    if (eq < 0) return nullptr;
    if (eq == 0) Py_RETURN_FALSE;
  }
  for (Py_ssize_t i = 0; i < nt; ++i) {
    PyObject* t = PyList_GET_ITEM(tensors, i);
    if (!THPVariable_Check(t)) {
      PyErr_SetString(PyExc_TypeError, "unchanged: tensors must hold tensors");
      return nullptr;
    }
    const long long want = PyLong_AsLongLong(PyList_GET_ITEM(versions, i));
    if (want == -1 && PyErr_Occurred()) return nullptr;
    try {
      if (static_cast<long long>(THPVariable_Unpack(t)._version()) != want) Py_RETURN_FALSE;
    } catch (const std::exception& e) {  // an inference tensor has no version counter
      PyErr_SetString(PyExc_RuntimeError, e.what());
      return nullptr;
    }
  }
  for (Py_ssize_t i = 0; i < nz; ++i) {
    const Py_ssize_t n = PyObject_Length(PyList_GET_ITEM(sized, i));
    if (n < 0) return nullptr;
    const long long want = PyLong_AsLongLong(PyList_GET_ITEM(sizes, i));
    if (want == -1 && PyErr_Occurred()) return nullptr;
    if (static_cast<long long>(n) != want) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set the CPU kernels run on in this process (effkernels.cpu_isa)."},
    {"unchanged", unchanged, METH_VARARGS,
     "effkernels.nn.blocks._State.unchanged's check over its lists (see python_module.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "effkernels operator library",
                                   -1, methods};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef EFFK_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
