// The Python module of one CPU-capability build of the kernels. Importing it runs the
// TORCH_LIBRARY_IMPL(vaekernels, CPU, ...) registrations of that build; vaekernels._backend
// imports exactly one, matching torch.backends.cpu.get_cpu_capability().
#include <pybind11/pybind11.h>

#define VAEKERNELS_STR2(x) #x
#define VAEKERNELS_STR(x) VAEKERNELS_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("capability") = VAEKERNELS_STR(CPU_CAPABILITY);
}
