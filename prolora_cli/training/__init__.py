"""Training: run arguments, the run folder, the data pipeline, optimizer and eval loss, the loop,
config files, FSDP, and the dry run."""
