// The Python module alig_fused._C. Importing it runs the static op registrations of the
// other sources (TORCH_LIBRARY / TORCH_LIBRARY_IMPL); it adds only has_cuda() and cpu_isa().
#include <Python.h>

#include <exception>

namespace alig_fused {
const char* cpu_isa_name();  // alig_cpu.cpp (alig_ops.h)
}

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

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(alig_fused::cpu_isa_name());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether this build has the CUDA kernels of alig_fused::alig_step_."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The instruction set of the CPU kernels: 'avx512', 'avx2' or 'generic' (capped by ALIG_FUSED_CPU_ISA)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, ALIG_STRINGIFY(TORCH_EXTENSION_NAME), "alig_fused's compiled ops (torch.ops.alig_fused).", -1, methods};

}  // namespace

PyMODINIT_FUNC ALIG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
