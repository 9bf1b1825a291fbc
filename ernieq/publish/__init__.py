"""Publishing: a hub-ready folder with its model card (``folder``, ``card``) and its check (``verify``).

Above ``eval`` in the floors (docs/ARCHITECTURE.md): the card's accuracy table is the report's
own renderer (``ernieq.eval.render``).
"""
