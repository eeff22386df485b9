"""Ray: joining or starting it, where a job runs, and Ray Jobs (kiln submit)."""
