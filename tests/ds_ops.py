"""Build DeepSpeed's JIT-compiled CPU op (cpu_adam, for the offload configs) into TORCH_EXTENSIONS_DIR. (Its
shared-memory comm op serves tensor-parallel inference only: the engine turns it off, lorasp_dist/engine/train.py.)

conftest.py runs this in the background when a session starts that has DeepSpeed runs in it, so that the first build
(~50 s on 2 cores) overlaps the quick tests, which run first. A rank that needs an op meanwhile waits for the build
(torch's lock file in the op's build directory) and then loads it, as it loads an op that another rank built.
"""

import deepspeed
from deepspeed.accelerator import get_accelerator

OPS = ("CPUAdamBuilder",)


def build() -> None:
    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            builder.load()


if __name__ == "__main__":
    build()
