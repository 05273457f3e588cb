"""One rank's run: build it from the config, train, tear down (run.py); the loop (trainer.py)."""
