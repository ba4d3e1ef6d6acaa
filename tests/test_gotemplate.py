import pytest

from daemon.registry.gotemplate import TemplateError, is_go_template, render, render_messages

LLAMA3 = (
    "{{- if or .System .Tools }}<|start_header_id|>system<|end_header_id|>\n"
    "{{- if .System }}\n\n{{ .System }}\n{{- end }}<|eot_id|>\n{{- end }}\n"
    "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
    "{{- if eq .Role \"user\" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ if $last }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}\n"
    "{{- else if eq .Role \"assistant\" }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Content }}"
    "{{ if not $last }}<|eot_id|>{{ end }}\n{{- end }}\n{{- end }}"
)
CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"}]


def test_messages_template():
    assert render_messages(LLAMA3, CHAT) == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_legacy_template_runs_per_turn_and_cuts_at_response():
    t = "{{ if .System }}[S]{{ .System }}{{ end }}[U]{{ .Prompt }}[A]{{ .Response }}[/A]"
    assert render_messages(t, CHAT) == "[S]S[U]Hi[A]Yo[/A][U]Bye[A]"


@pytest.mark.parametrize("template,values,out", [
    ("{{ .A }}-{{ .B.C }}", {"A": 1, "B": {"C": "x"}}, "1-x"),
    ("{{- .A -}} | {{- .A }}", {"A": "a"}, "a|a"),
    ("{{/* comment */}}x", {}, "x"),
    ("{{ if and .A .B }}y{{ else if .A }}a{{ else }}n{{ end }}", {"A": 1, "B": 0}, "a"),
    ("{{ range .L }}<{{ . }}>{{ else }}empty{{ end }}", {"L": []}, "empty"),
    ("{{ range $i, $v := .L }}{{ $i }}={{ $v }};{{ end }}", {"L": ["a", "b"]}, "0=a;1=b;"),
    ("{{ with .X }}{{ .Y }}{{ end }}", {"X": {"Y": "in"}}, "in"),
    ("{{ $x := 1 }}{{ $x = 2 }}{{ $x }}", {}, "2"),
    ('{{ printf "%s=%d" "n" 5 }}', {}, "n=5"),
    ("{{ .L | len }} {{ index .L 1 }} {{ json .M }}", {"L": [1, 2], "M": {"a": 1}}, '2 2 {"a":1}'),
    ("{{ eq .R \"a\" \"b\" }} {{ ne 1 2 }} {{ lt 1 2 }} {{ not true }}", {"R": "b"}, "true true true false"),
    ("{{ (index .L 0).N }}", {"L": [{"N": "z"}]}, "z"),
])
def test_subset(template, values, out):
    assert render(template, values) == out


def test_errors():
    with pytest.raises(TemplateError):
        render("{{ if .A }}x", {})
    with pytest.raises(TemplateError):
        render("{{ nosuchfunc 1 }}", {})


@pytest.mark.parametrize("text,go", [("{{ .Prompt }}", True), ("{{- if .System }}x{{ end }}", True),
                                     ("{% for m in messages %}{{ m.content }}{% endfor %}", False),
                                     ("{{ bos_token }}{{ messages[0]['content'] }}", False)])
def test_detection(text, go):
    assert is_go_template(text) is go


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": {"type": "object", "required": ["city"],
                                                        "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("template,out", [
    ("{{ range .Tools }}{{ . }}{{ end }}", '{"type":"function","function":{"name":"get_weather","description":'
     '"Weather in a city","parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}}}'),
    ("{{ range .Tools }}{{ .Function }}{{ end }}", '{"name":"get_weather","description":"Weather in a city",'
     '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}}'),
    ("{{ range .Tools }}{{ .Type }} {{ .Function.Name }}: {{ .Function.Description }}{{ end }}",
     "function get_weather: Weather in a city"),
    ("{{ range .Tools }}{{ .Function.Parameters }}|{{ .Function.Parameters.Required }}{{ end }}",
     '{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}|[city]'),
    ("{{ range .Tools }}{{ range $k, $v := .Function.Parameters.Properties }}{{ $k }}={{ $v.type }}{{ end }}{{ end }}",
     "city=string"),
    ("{{ json .Tools }}", '[' + '{"type":"function","function":{"name":"get_weather","description":"Weather in a city",'
     '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string"}}}}}' + ']'),
    ("{{ if .Tools }}{{ len .Tools }} tool{{ end }}", "1 tool"),
    ("{{ range .Messages }}{{ range .ToolCalls }}{{ .Function.Name }}{{ .Function.Arguments }}{{ end }}{{ end }}",
     'get_weather{"city":"Paris"}'),
])
def test_tools_are_ollamas_structs(template, out):
    """Ollama's api.Tool / ToolFunction print as their JSON and expose their Go fields."""
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                   "arguments": {"city": "Paris"}}}]}]
    rendered = render_messages(template, messages, tools=[TOOL])
    assert rendered == out


@pytest.mark.parametrize("template,line", [("{{ .Prompt ", 1), ("a\nb {{ if .System }}x{{ end }} {{ .Prompt", 2),
                                           ("[INST] {{- .Prompt }} {{", 1)])
def test_an_unclosed_action_is_an_error_not_text(template, line):
    with pytest.raises(TemplateError, match=f"template: :{line}: unclosed action"):
        render_messages(template, [{"role": "user", "content": "hi"}])
