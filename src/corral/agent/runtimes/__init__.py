"""Task runtimes: implementations of the `corral.agent.exec` Executor/Controller seam."""

from corral.agent.runtimes.process import ProcessController, ProcessExecutor

__all__ = ["ProcessController", "ProcessExecutor"]
