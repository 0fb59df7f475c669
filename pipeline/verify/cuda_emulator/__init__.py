"""GPU kernels checked on a CPU: TVM's CUDA source built with g++ against a header that
defines the CUDA device language (cuda_on_cpu.h), its kernels run thread by thread
(program.py) and compared with the unscheduled kernels built for the CPU (kernel_check.py)."""
