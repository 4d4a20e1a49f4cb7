"""How often the bundled Qwen model makes a valid tool call, under `tool_choice` auto and required.

50 varied requests (weather, time, currency, search, calculator, e-mail, calendar, translation,
stock prices; English, Chinese, Japanese, French, German, Spanish; some where no call fits) go
through the `openai` SDK to one `easllm serve`, greedy. A call counts as valid when it names the
expected tool and its arguments hold the expected values (case-insensitive substring) — the
server already guarantees that every call it returns names an offered tool and fits its schema.
It is a count, not a timing.

    .venv/bin/python bench/tool_calls.py                      # all 50, auto and required
    .venv/bin/python bench/tool_calls.py --limit 6 --modes auto   # a smoke run
    .venv/bin/python bench/tool_calls.py --url http://127.0.0.1:8000 --token T   # a running server
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import running_server


def function(name: str, description: str, **properties: str) -> dict:
    props = {key: {"type": "string", "description": text} for key, text in properties.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": list(props)},
        },
    }


WEATHER = function("get_weather", "Get the current weather of a city", city="the city's name")
TIME = function("get_time", "Get the current local time in an IANA time zone", timezone="e.g. Asia/Tokyo")
CURRENCY = function(
    "convert_currency",
    "Convert an amount of money",
    amount="the amount",
    source="ISO code",
    target="ISO code",
)
SEARCH = function("web_search", "Search the web", query="what to search for")
CALC = function("calculate", "Evaluate an arithmetic expression", expression="e.g. 2*(3+4)")
EMAIL = function("send_email", "Send an e-mail", to="the address", subject="the subject", body="the text")
CALENDAR = function("create_event", "Add an event to the calendar", title="what", date="YYYY-MM-DD")
TRANSLATE = function("translate", "Translate a text", text="the text", language="the target language")
STOCK = function("get_stock_price", "Get the latest price of a stock", symbol="the ticker symbol")
ALL = [WEATHER, TIME, CURRENCY, SEARCH, CALC, EMAIL, CALENDAR, TRANSLATE, STOCK]


@dataclass(frozen=True)
class Case:
    question: str
    tools: tuple[dict, ...]
    expected: str | None  # the tool to call; None: no call fits
    values: dict[str, str] | None = None  # argument -> a substring its value must hold


CASES = [
    Case("What is the weather in Tokyo?", (WEATHER,), "get_weather", {"city": "tokyo"}),
    Case("Is it raining in London right now?", (WEATHER, TIME), "get_weather", {"city": "london"}),
    Case("How hot is it in Cairo today?", (WEATHER, SEARCH), "get_weather", {"city": "cairo"}),
    Case("北京今天天气怎么样？", (WEATHER,), "get_weather", {"city": ""}),
    Case("東京の天気を教えてください。", (WEATHER, TIME), "get_weather", {"city": ""}),
    Case("Quel temps fait-il à Paris ?", (WEATHER,), "get_weather", {"city": "paris"}),
    Case("Wie ist das Wetter in Berlin?", ALL, "get_weather", {"city": "berlin"}),
    Case("¿Qué tiempo hace en Madrid?", (WEATHER, CALC), "get_weather", {"city": "madrid"}),
    Case("What time is it in Asia/Tokyo?", (TIME,), "get_time", {"timezone": "tokyo"}),
    Case(
        "Tell me the current time in the Europe/Paris time zone.",
        (WEATHER, TIME),
        "get_time",
        {"timezone": "paris"},
    ),
    Case("What's the local time in America/New_York?", ALL, "get_time", {"timezone": "new_york"}),
    Case("现在 Asia/Shanghai 时区几点了？", (TIME,), "get_time", {"timezone": "shanghai"}),
    Case("Convert 100 USD to EUR.", (CURRENCY,), "convert_currency", {"source": "usd", "target": "eur"}),
    Case("How many yen is 50 dollars?", (CURRENCY, CALC), "convert_currency", {"target": "jp"}),
    Case("Combien font 20 euros en livres sterling ?", ALL, "convert_currency", {"source": "eur"}),
    Case(
        "Search the web for the latest news about the James Webb telescope.",
        (SEARCH,),
        "web_search",
        {"query": "webb"},
    ),
    Case("Look up who won the 2022 World Cup.", (SEARCH, CALC), "web_search", {"query": "world cup"}),
    Case("Find reviews of the Fairphone 5 online.", ALL, "web_search", {"query": "fairphone"}),
    Case("Busca en internet recetas de paella.", (SEARCH,), "web_search", {"query": "paella"}),
    Case("Calculate 17 * 23.", (CALC,), "calculate", {"expression": "17"}),
    Case("What is (12 + 8) / 4? Use the calculator.", (CALC, SEARCH), "calculate", {"expression": "12"}),
    Case("Compute 2 to the power of 10 with the calculator tool.", ALL, "calculate", {"expression": "2"}),
    Case("请计算 345 加 678。", (CALC,), "calculate", {"expression": "345"}),
    Case(
        "Send an email to bob@example.com with the subject Lunch and the text 'See you at noon'.",
        (EMAIL,),
        "send_email",
        {"to": "bob@example.com"},
    ),
    Case(
        "E-mail alice@example.org that the meeting moved to Friday.",
        (EMAIL, CALENDAR),
        "send_email",
        {"to": "alice"},
    ),
    Case(
        "Schreibe eine E-Mail an team@example.de: Betreff Urlaub, Text: Ich bin weg.",
        ALL,
        "send_email",
        {"to": "team"},
    ),
    Case(
        "Add a dentist appointment on 2026-03-14 to my calendar.",
        (CALENDAR,),
        "create_event",
        {"date": "2026-03-14"},
    ),
    Case(
        "Put 'Team offsite' in the calendar for 2026-06-01.",
        (CALENDAR, EMAIL),
        "create_event",
        {"date": "2026-06-01"},
    ),
    Case("Crée un événement « Anniversaire » le 2026-09-09.", ALL, "create_event", {"date": "2026-09-09"}),
    Case("Translate 'good morning' into Japanese.", (TRANSLATE,), "translate", {"text": "good morning"}),
    Case(
        "How do you say 'thank you' in German? Use the translator.",
        (TRANSLATE, SEARCH),
        "translate",
        {"text": "thank"},
    ),
    Case("把“我爱你”翻译成法语。", ALL, "translate", {"language": ""}),
    Case("What is Apple's stock price?", (STOCK,), "get_stock_price", {"symbol": "aapl"}),
    Case("Get the latest price of MSFT.", (STOCK, SEARCH), "get_stock_price", {"symbol": "msft"}),
    Case("How much is one share of NVDA right now?", ALL, "get_stock_price", {"symbol": "nvda"}),
    Case("トヨタ (7203.T) の株価は？", (STOCK,), "get_stock_price", {"symbol": "7203"}),
    Case("Weather in Sydney, please.", ALL, "get_weather", {"city": "sydney"}),
    Case("I need the temperature in Oslo.", (WEATHER, STOCK), "get_weather", {"city": "oslo"}),
    Case("Price of the TSLA stock?", (STOCK, WEATHER), "get_stock_price", {"symbol": "tsla"}),
    Case(
        "Search for 'best hiking trails in Patagonia'.",
        (SEARCH, WEATHER),
        "web_search",
        {"query": "patagonia"},
    ),
    # no call fits
    Case("Write a haiku about autumn leaves.", (WEATHER,), None),
    Case("What is the capital of France?", (STOCK,), None),
    Case("Say hello in French.", (CALC,), None),
    Case("Explain what a Python list comprehension is.", (WEATHER, TIME), None),
    Case("Tell me a short joke about cats.", (EMAIL,), None),
    Case("用一句话介绍一下长城。", (STOCK, CURRENCY), None),
    Case("Write a Python function that reverses a string.", (SEARCH,), None),
    Case("Qu'est-ce que la photosynthèse ? Réponds en une phrase.", (CALENDAR,), None),
    Case("Hi! How are you?", ALL, None),
    Case("Name three primary colors.", (TRANSLATE,), None),
]


@dataclass
class Outcome:
    case: Case
    names: list[str]  # the tools called, in order
    valid: bool  # the expected tool, with the expected values


def judge(case: Case, message) -> Outcome:
    calls = message.tool_calls or []
    names = [c.function.name for c in calls]
    valid = False
    for call in calls:
        if call.function.name != case.expected:
            continue
        arguments = json.loads(call.function.arguments)
        values = case.values or {}
        if all(needle in str(arguments.get(key, "")).lower() for key, needle in values.items()):
            valid = valid or all(key in arguments for key in values)
    return Outcome(case, names, valid)


def ask(client: openai.OpenAI, case: Case, mode: str) -> Outcome:
    reply = client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": case.question}],
        tools=list(case.tools),
        tool_choice=mode,  # type: ignore[arg-type]
        temperature=0,
    )
    return judge(case, reply.choices[0].message)


@contextmanager
def server_url(args: argparse.Namespace) -> Iterator[tuple[str, str | None]]:
    if args.url:
        yield args.url, args.token
        return
    flags = [
        "--model-path",
        args.model,
        "--threads",
        str(args.threads),
        "--max-new-tokens",
        "160",
        "--api-only",
    ]
    with tempfile.TemporaryDirectory() as tmp, running_server(flags, Path(tmp)) as server:
        yield server.url, server.token


def report(mode: str, outcomes: list[Outcome], seconds: float) -> None:
    expected = [o for o in outcomes if o.case.expected is not None]
    free = [o for o in outcomes if o.case.expected is None]
    called = sum(1 for o in expected if o.names)
    valid = sum(1 for o in expected if o.valid)
    quiet = sum(1 for o in free if not o.names)
    print(
        f"{mode:<9} {valid:>3}/{len(expected):<3} valid   {called:>3}/{len(expected):<3} any call   "
        f"{quiet:>3}/{len(free):<3} no call where none fits   {seconds:>6.0f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="auto,required", help="comma-separated tool_choice values")
    parser.add_argument("--limit", type=int, default=len(CASES), help="the first N cases (smoke runs)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (batched by the engine)"
    )
    parser.add_argument("--url", default=None, help="a running server instead of starting one")
    parser.add_argument("--token", default=None)
    parser.add_argument("--verbose", action="store_true", help="print every case's calls")
    args = parser.parse_args()
    cases = CASES[: args.limit]
    with server_url(args) as (url, token):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token or "none", max_retries=0, timeout=600)
        print(f"model {args.model}, {len(cases)} requests per mode, greedy")
        for mode in args.modes.split(","):
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                outcomes = list(pool.map(lambda case, m=mode: ask(client, case, m), cases))
            report(mode, outcomes, time.perf_counter() - start)
            if args.verbose:
                for o in outcomes:
                    mark = "ok " if o.valid else "   "
                    print(f"   {mark} {o.case.expected or '-':<17} {o.names} {o.case.question}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
