# fedq for the coordinator and the workers. PyTorch comes first so pip keeps the build chosen here;
# pass --build-arg TORCH_SPEC=... for another (a CPU-only build keeps the image small).
FROM python:3.11-slim
ARG TORCH_SPEC="torch>=2.1,<3"
RUN pip install --no-cache-dir "${TORCH_SPEC}"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedq ./fedq
COPY shared ./shared
COPY coordinator ./coordinator
COPY worker ./worker
RUN pip install --no-cache-dir .
RUN useradd --create-home fedq
USER fedq
# A site's state (.fedq-state) and a run's files land under the working folder: /app is root's.
WORKDIR /home/fedq
ENTRYPOINT ["fedq"]
