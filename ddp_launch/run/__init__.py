"""Running the local worker group: supervision, the warm forkserver, workers, their output."""
