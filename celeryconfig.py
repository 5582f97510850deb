"""Celery settings shared by every process. URLs come from the environment (orchestrator.config).

Step work is long and must survive a worker's death: acks late, prefetch one. A task whose pool
process dies is not put back on the queue (that redelivers a task that kills its process for
ever): a step or compensation counts it as a failed attempt under its retry policy
(orchestrator/steps.py), any other task fails. A worker killed whole never acknowledged its
message, so the broker delivers it again. Queues are durable; publishing waits for the broker's
confirm.
"""
from kombu import Exchange, Queue

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True

task_acks_late = True
task_reject_on_worker_lost = False
worker_prefetch_multiplier = 1
task_track_started = True
# Flower shows every task of every workflow from these events.
worker_send_task_events = True
task_send_sent_event = True

# One durable queue per kind of work.
task_default_queue = "default"
task_queues = (
    Queue("default", Exchange("default", durable=True), routing_key="default", durable=True),
    Queue("media", Exchange("media", durable=True), routing_key="media", durable=True),
    Queue("engine", Exchange("engine", durable=True), routing_key="engine", durable=True),
    # Chat tasks for the execution service (seed 003); our own workers do not consume it.
    Queue("execution", Exchange("execution", durable=True), routing_key="execution", durable=True),
)
task_routes = {
    "media.*": {"queue": "media", "routing_key": "media"},
    "engine.*": {"queue": "engine", "routing_key": "engine"},
    "execution.*": {"queue": "execution", "routing_key": "execution"},
}
task_create_missing_queues = True

broker_connection_retry_on_startup = True
# After a lost broker connection with tasks still running, Celery lowers the prefetch count and
# raises it again as they finish; under RabbitMQ's per-consumer QoS the raise never reaches the
# consumer, and a worker (ours, or the execution service's) could stop taking messages after a
# RabbitMQ restart while they piled up in its queue (celery/celery#9512). Celery's documented
# workaround: keep the prefetch count as it is.
worker_enable_prefetch_count_reduction = False
broker_transport_options = {"confirm_publish": True, "max_retries": 3}
broker_pool_limit = 10

# The result backend is a convenience for callers, never the workflow's truth: bounded waits so
# a stalled Redis cannot hang a worker, short expiry so it does not grow.
result_expires = 3600
redis_socket_timeout = 5.0
redis_socket_connect_timeout = 5.0
redis_retry_on_timeout = True
result_backend_transport_options = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}

worker_hijack_root_logger = False
worker_cancel_long_running_tasks_on_connection_loss = True
