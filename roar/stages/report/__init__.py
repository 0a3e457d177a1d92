"""``roar report``: the results of a run on one page (``stage.run``), built from sections
(``sections``, ``maps``, ``trust``) of blocks (``document``), rendered by Jinja2 templates
(``render``) to self-contained HTML and to markdown."""
