"""What the user sees: formatting, the live view, events, metrics, status, failure and run reports."""
