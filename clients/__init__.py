"""poegen's clients: the SDK (:mod:`.sdk`, :mod:`.spec`, :mod:`.stack`, :mod:`.outputs`) and
the ``poegen`` CLI (:mod:`.cli`). The main names are re-exported at the top level
(``from poegen import Client``)."""
