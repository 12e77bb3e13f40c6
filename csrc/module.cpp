// The Python module alig_fused._C. Importing it runs the static op registrations of the
// other sources (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); it adds only has_cuda().
#include <Python.h>

// The module's name: _C when setup.py builds alig_fused._C; the JIT build (cpp_ops.py)
// names it after its cache entry, and Python calls PyInit_<that name>.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define ALIG_CONCAT_(a, b) a##b
#define ALIG_CONCAT(a, b) ALIG_CONCAT_(a, b)
#define ALIG_STRINGIFY_(x) #x
#define ALIG_STRINGIFY(x) ALIG_STRINGIFY_(x)

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

PyModuleDef module = {PyModuleDef_HEAD_INIT, ALIG_STRINGIFY(TORCH_EXTENSION_NAME), "alig_fused's compiled ops (torch.ops.alig_fused).", -1, methods};

}  // namespace

PyMODINIT_FUNC ALIG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
