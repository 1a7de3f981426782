"""The MHA/GQA/MQA quality study: the runs (run), what is measured on each model (metrics), the report."""
