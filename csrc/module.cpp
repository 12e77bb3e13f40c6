// The Python module alig_fused._C. Importing it runs the static op registrations of the
// other sources (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); it adds only has_cuda().
#include <Python.h>

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef ALIG_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether this build has the CUDA kernels of alig_fused::alig_step_."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "alig_fused._C", "alig_fused's compiled ops (torch.ops.alig_fused).", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
