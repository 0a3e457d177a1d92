# CUDA-enabled PyTorch runtime image (ships torch, torchvision, CUDA 12.4, cuDNN 9).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV MPLBACKEND=Agg \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Unprivileged user owning the workspace; data/ and runs/ are usually bind-mounted.
RUN useradd --create-home --uid 1000 --shell /bin/bash roar \
    && mkdir -p /workspace/data /workspace/runs \
    && chown -R roar:roar /workspace

WORKDIR /workspace

# Package metadata and sources first, so the dependency layer is reused
# when only configs, tests or docs change.
COPY --chown=roar:roar pyproject.toml README.md ./
COPY --chown=roar:roar roar ./roar

# torch>=2.1 and torchvision are already satisfied by the base image, so pip
# keeps the preinstalled CUDA build instead of replacing it.
RUN pip install --no-cache-dir -e '.[dev]' \
    && chown -R roar:roar /workspace

COPY --chown=roar:roar . .

# Runs the container's command, e.g. `docker run --rm roar task --list`;
# without arguments, CMD (an interactive shell).
COPY --chmod=0755 docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# Numeric uid:gid of the roar user, resolvable on any host.
USER 1000:1000

ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["bash"]
