"""Upload bytes held in memory by all requests of this process, whichever face reads them."""

from __future__ import annotations

from resnet_service.core.errors import Overloaded


class UploadBudget:
    """Upload bytes held in memory by all requests of this process (event-loop thread only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.capacity:
            raise Overloaded(
                f"Uploads in progress already hold {self.used} bytes (limit {self.capacity}); "
                "retry shortly.",
                retry_after_s=1,
            )
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size
