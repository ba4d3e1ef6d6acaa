"""The aiohttp application: routes, middleware, streaming."""
