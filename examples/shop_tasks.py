"""An application's tasks module, as the testing example (``test_shop_tasks.py``) and
docs/testing.md use it: typed tasks on a ``Server``, built by a function so that each
test gets a fresh one (the in-memory backends start empty)."""

from __future__ import annotations

import attrs

from tasqueue_anyio import Server, TaskFunction, current_job


@attrs.frozen
class Shop:
    """The server and its tasks (a module-level ``server`` works the same way)."""

    server: Server
    add_to_cart: TaskFunction[[str, int], int]
    checkout: TaskFunction[[str], str]


def make_shop(server: Server | None = None) -> Shop:
    server = server or Server()  # in-memory backends unless given others
    carts: dict[str, int] = {}

    @server.task(queue="shop")
    async def add_to_cart(cart: str, items: int) -> int:
        if items <= 0:
            raise ValueError(f"cannot add {items} items")
        carts[cart] = carts.get(cart, 0) + items
        await current_job().set_progress(1.0, f"{cart} has {carts[cart]} items")
        return carts[cart]

    @server.task(queue="shop")
    def checkout(cart: str) -> str:  # a plain def: runs in a worker thread
        return f"{cart}: {carts.pop(cart, 0)} items paid"

    return Shop(server, add_to_cart, checkout)
