"""The problem's fixed sizes, one home on the Python side.

``templates/kernels/mla_constants.h`` holds the same values for the kernels; a test checks that they agree.
"""

HEAD_DIM = 576          # q / k head dim: 512 latent channels + 64 rope channels
HEAD_DIM_V = 512        # v head dim = the leading channels of k
ROPE_DIM = 64           # rope channels (the last 64 of q / k)
BLOCK_M = 64            # q rows per CTA (wgmma M)
SCHED_BLOCK_N = 64      # scheduler block in KV tokens (flash_mla/scheduler.py)
METADATA_SIZE = 8       # int32 columns of a tile-scheduler metadata row
QREG_CHANNELS = 384     # qreg schedule: Q channels held in registers (the other 192 in shared memory)
PRODUCER_REGS = 40      # full_wg with a producer warpgroup: its registers per thread (setmaxnreg.dec; 24 spilled)
CONSUMER_REGS = 232     # ... and each consumer warpgroup's (setmaxnreg.inc): 128 * (40 + 2 * 232) <= 64K

# name in mla_constants.h -> value here
KERNEL_CONSTANTS = {"kHeadDim": HEAD_DIM, "kHeadDimV": HEAD_DIM_V, "kRopeDim": ROPE_DIM, "kBlockM": BLOCK_M,
                    "kSchedBlockN": SCHED_BLOCK_N, "kMetadataSize": METADATA_SIZE,
                    "kQregChannels": QREG_CHANNELS, "kProducerRegs": PRODUCER_REGS, "kConsumerRegs": CONSUMER_REGS}
