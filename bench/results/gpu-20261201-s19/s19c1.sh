# session 19 call 1 (1x H200, cold machine, carry .whl-ray .gpu/s19c1.sh): Ray's wheel alone into /tmp/site, since the
# tree and the whole wheelhouse pass the 64 MiB a call carries; the next calls carry the rest of the wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-ray/*.whl && echo "ray installed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; df -h /tmp | tail -1
