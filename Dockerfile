# fedmq image for the aggregator, the agents and `fedmq broker init` (compose.yaml).
# numpy backend only: no torch; the server extra for the bundled digits data and /metrics.
# The fixed uid 10001 owns the generated keys (compose `pki`).
FROM python:3.11-slim
# espeak-ng synthesises the speech example's households (`fedmq data split speech`).
RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY fedmq ./fedmq
COPY runtime ./runtime
COPY cli ./cli
COPY broker ./broker
COPY edge_agent ./edge_agent
COPY aggregator ./aggregator
COPY models ./models
COPY simulator ./simulator
RUN pip install --no-cache-dir ".[server]" \
 && useradd --create-home --uid 10001 fedmq \
 && mkdir -p /data /state /pki /certs \
 && chown fedmq /data /state /pki
USER fedmq
ENTRYPOINT ["fedmq"]
