"""The accelerate configs composer ships (package data: `compose ls` lists them, `compose cp` copies one)."""
