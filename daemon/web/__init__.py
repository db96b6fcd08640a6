"""The web console for the support lead: what mailtriage decided and why, the queues a person sorts,
and the model versions (``mailtriage web``, or ``[web] enabled = true`` inside ``serve``)."""
