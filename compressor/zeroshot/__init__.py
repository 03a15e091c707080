"""Zero-shot tasks through lm-evaluation-harness: task definitions bound to local data, and the hooks the
pipeline calls (``measure``, ``section``, ``table_rows``)."""

from compressor.zeroshot.harness import measure, section, table_rows, zeroshot_accuracy
from compressor.zeroshot.tasks import check_tasks, known_tasks, task_configs

__all__ = ["check_tasks", "known_tasks", "measure", "section", "table_rows", "task_configs", "zeroshot_accuracy"]
