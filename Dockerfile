# vLLM's OpenAI-compatible server with the vllm-kvcompress plugin built in.
#
#   docker build -t vllm-kvcompress .
#   docker run --gpus all --ipc=host -p 8000:8000 \
#       -v ~/.cache/huggingface:/root/.cache/huggingface \
#       vllm-kvcompress MODEL --kv-offloading-size 16 --enable-compression
#
# The base tag must be the vLLM version pyproject.toml pins (tests/test_dockerfile.py
# checks it): the extension is compiled against the torch that this vLLM ships, and
# with any other version pip would try to replace vLLM and torch in the image.
FROM vllm/vllm-openai:v0.26.0

# GPU targets of the CUDA kernels. Spelled in lower case like vLLM's own build
# argument, because an ENV TORCH_CUDA_ARCH_LIST set by the base image would take
# precedence over a build argument of that name.
ARG torch_cuda_arch_list="8.0 8.9 9.0 10.0+PTX"
ARG max_jobs=4

WORKDIR /opt/vllm-kvcompress
COPY . .

# --no-build-isolation builds against the image's torch rather than a fresh copy
# from PyPI. KVCOMPRESS_CUDA=ON makes a missing CUDA toolkit a build error instead
# of an image that silently has CPU kernels only. The final check runs from / so it
# imports the installed package, not the source tree.
RUN python3 -m pip install --no-cache-dir "cmake>=3.21" ninja \
    && CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
       KVCOMPRESS_CUDA=ON \
       TORCH_CUDA_ARCH_LIST="${torch_cuda_arch_list}" \
       MAX_JOBS="${max_jobs}" \
       python3 -m pip install --no-cache-dir --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && cd / \
    && python3 -c "import importlib.metadata as md, torch, vllm_kvcompress._custom_ops; \
assert torch._C._dispatch_has_kernel_for_dispatch_key('kvcompress::compress', 'CUDA'), \
'vllm_kvcompress was built without its CUDA kernels'; \
assert any(ep.name == 'kvcompress' for ep in md.entry_points(group='vllm.general_plugins')), \
'the kvcompress vllm.general_plugins entry point is not registered'"

# Back to the base image's working directory, away from the source tree.
WORKDIR /vllm-workspace

# The base image's entrypoint, restated so that `docker run IMAGE MODEL --flags`
# keeps meaning `vllm serve MODEL --flags` whatever the base image does later.
ENTRYPOINT ["vllm", "serve"]
