"""What the user reads: the versioned JSON report, the HTML report and terminal output."""
