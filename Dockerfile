# One image for the API and the worker; docker-compose.yml picks the role.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MODELPRESS_DATA_DIR=/data MODELPRESS_HOST=0.0.0.0 MODELPRESS_PORT=8000

WORKDIR /app
# bubblewrap confines each job's process (workers/sandbox.py); the worker container must be allowed to
# create user namespaces (docker-compose.yml: security_opt with deploy/seccomp-worker.json, see the README).
# g++ lets torch.compile / AOTInductor build their kernels (.pt2 jobs with evaluation.runtime compile or aoti).
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap g++ && rm -rf /var/lib/apt/lists/*
# torch first, from the CPU wheel index: the default wheel carries CUDA (several GB) that a CPU worker never uses.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY modelpress ./modelpress
COPY service ./service
COPY workers ./workers
RUN pip install . && useradd --create-home --uid 10001 modelpress && mkdir -p /data && chown modelpress /data
USER modelpress
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["python", "-m", "modelpress.stack"]
CMD ["api"]
