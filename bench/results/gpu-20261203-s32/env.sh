# sourced by every device call of session 32: environment, carried wheels (no Ray: ours runs through torchrun), the project installed editable
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext LORASP_GIT_REV=8dfb009
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cache/whl-gpu/*.whl || exit 1
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
