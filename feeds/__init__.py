"""Inputs that publish ticks to the ``ticks`` topic (replay of recorded trades; live
exchange feeds come later). Each adapter yields :class:`core.models.Tick`."""
