"""orchestrator: durable multi-step workflows on Celery, RabbitMQ, PostgreSQL, Redis and Kafka."""
