# fedmq image for the aggregator and agents (compose.yaml). numpy backend only: no torch.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedmq ./fedmq
COPY broker ./broker
COPY edge_agent ./edge_agent
COPY aggregator ./aggregator
COPY models ./models
COPY simulator ./simulator
RUN pip install --no-cache-dir . && useradd --create-home fedmq && mkdir -p /data /state && chown fedmq /data /state
USER fedmq
ENTRYPOINT ["fedmq"]
