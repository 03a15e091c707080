"""CushionCache (Son et al., EMNLP 2024): a prefix key/value cache in front of every input that removes the
attention-sink activation outliers from the text after it, so that per-tensor 8-bit activations work.

``config`` (CushionConfig), ``prefix`` (the prefix as a cache, save/load, generate), ``error`` (the quantization
error per candidate, the outlier statistic), ``search`` (greedy, outlier tokens), ``tuning`` (prefix tuning),
``stage`` (``run_cushion``: search, tune, measure, save).
"""
