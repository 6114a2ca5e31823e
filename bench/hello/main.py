"""The baseline: a bare functions-framework function, served exactly like ours."""

import functions_framework


@functions_framework.http
def hello(request):
    return "hello"
