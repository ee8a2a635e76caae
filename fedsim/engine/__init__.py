"""The run: CLI, runner, Flower ServerApp and ClientApp, round driver, recording."""
