FROM python:3.11-slim
WORKDIR /app
# git: the local repository backend and the GitLab emulator store projects as git repositories
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
COPY . .
RUN pip install --no-cache-dir -e . && useradd --create-home app
USER app
EXPOSE 8000 5555
CMD ["orchestrator", "api"]
