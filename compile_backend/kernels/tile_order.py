"""The order of output tiles shared by the generated convolution kernels (``gemm_template``'s
implicit-GEMM template, ``conv_tma``'s). Imports Triton: the generated sources import it, the
builders do not."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` over a grid_m x grid_n tile grid in grouped order:
    GROUP_M row tiles walk the columns together, so the weight tiles they share stay in L2."""
    width = GROUP_M * grid_n
    group_id = pid // width
    group_size = min(grid_m - group_id * GROUP_M, GROUP_M)
    return group_id * GROUP_M + (pid % width) % group_size, (pid % width) // group_size
