"""The task scheduler (`task.*`): durable queues, worker leases, retries, timeouts, cancels, schedules."""
