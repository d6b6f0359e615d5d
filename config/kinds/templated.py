"""The `templated` kind: any partner that hands over a postback URL template with macros."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from config.destination_base import DestinationBase
from schemas.macros import Template, TemplateError, compile_template, compile_url_template


class TemplatedDestination(DestinationBase):
    """Any partner that hands over a postback URL template with macros."""

    kind: Literal["templated"]
    url: str = Field(min_length=8, max_length=4096)
    method: Literal["GET", "POST"] = "GET"
    body: dict[str, str] | None = Field(
        default=None, description="POST body fields; values are templates"
    )
    body_format: Literal["json", "form"] = "json"
    headers: dict[str, str] = Field(default_factory=dict)

    _url: Template = PrivateAttr()
    _body: dict[str, Template] = PrivateAttr(default_factory=dict)
    _headers: dict[str, Template] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _compile_templates(self) -> TemplatedDestination:
        creds = frozenset(self.credentials)
        field = "url"
        try:
            self._url = compile_url_template(self.url, creds)
            for key, text in (self.body or {}).items():
                field = f"body.{key}"
                self._body[key] = compile_template(text, creds)
            for key, text in self.headers.items():
                field = f"headers.{key}"
                header = compile_template(text, creds)
                if header.uses_event:
                    raise TemplateError("headers may use (credential:NAME) macros only")
                self._headers[key] = header
        except TemplateError as exc:
            raise ValueError(f"{field}: {exc}") from None
        if self.body is not None and self.method != "POST":
            raise ValueError('body: a body template needs method = "POST"')
        return self

    @property
    def url_template(self) -> Template:
        return self._url

    @property
    def body_templates(self) -> dict[str, Template]:
        return self._body

    @property
    def header_templates(self) -> dict[str, Template]:
        return self._headers
