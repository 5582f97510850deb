FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -e . && useradd --create-home app
USER app
EXPOSE 8000 5555
CMD ["orchestrator", "api"]
