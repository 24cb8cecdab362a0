"""The run report: report.json and report.html, their assembly, and the headless-browser check."""
