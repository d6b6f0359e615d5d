FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY producers ./producers
COPY schemas ./schemas
COPY config ./config
RUN pip install --no-cache-dir . && useradd --system relay
USER relay
ENV POSTBACK_RELAY_LOG_FORMAT=json POSTBACK_RELAY_DATA_DIR=/tmp/postback-relay
