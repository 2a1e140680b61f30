"""Static pools for the synthetic brand: names, places, products, stores, user agents.

The pools are deliberately small. Real Chinese customer bases are dominated by a handful of
surnames and popular given names, so two strangers called "Wang Fang" are common; identity
resolution must not merge people on a name. Every string here is plain text without quotes,
backslashes or commas, so the generator can splice them into JSON lines and CSV rows without
escaping.
"""

from __future__ import annotations

from typing import Final

# (pinyin, weight): the most common surnames, weights roughly proportional to their share.
SURNAMES: Final[tuple[tuple[str, float], ...]] = (
    ("Wang", 7.3),
    ("Li", 7.2),
    ("Zhang", 6.8),
    ("Liu", 5.4),
    ("Chen", 4.5),
    ("Yang", 3.1),
    ("Huang", 2.3),
    ("Zhao", 2.3),
    ("Wu", 2.1),
    ("Zhou", 2.1),
    ("Xu", 1.7),
    ("Sun", 1.5),
    ("Ma", 1.5),
    ("Zhu", 1.3),
    ("Hu", 1.3),
    ("Guo", 1.2),
    ("He", 1.2),
    ("Lin", 1.1),
    ("Gao", 1.1),
    ("Luo", 0.9),
)

GIVEN_FEMALE: Final[tuple[tuple[str, float], ...]] = (
    ("Fang", 5.0),
    ("Jing", 4.5),
    ("Min", 4.0),
    ("Li", 3.8),
    ("Yan", 3.6),
    ("Na", 3.4),
    ("Ting", 3.2),
    ("Xiuying", 3.0),
    ("Hui", 2.8),
    ("Xin", 2.6),
    ("Yu", 2.4),
    ("Yuting", 2.2),
    ("Jiayi", 2.0),
    ("Zihan", 1.8),
    ("Xiaoyan", 1.6),
    ("Mei", 1.5),
    ("Lan", 1.3),
    ("Qian", 1.2),
    ("Shu", 1.0),
    ("Wen", 1.0),
)

GIVEN_MALE: Final[tuple[tuple[str, float], ...]] = (
    ("Wei", 5.0),
    ("Lei", 4.2),
    ("Qiang", 3.8),
    ("Jun", 3.6),
    ("Yong", 3.2),
    ("Jie", 3.0),
    ("Tao", 2.8),
    ("Ming", 2.6),
    ("Chao", 2.4),
    ("Hao", 2.2),
    ("Peng", 2.0),
    ("Hua", 1.8),
    ("Bo", 1.6),
    ("Haoran", 1.5),
    ("Yuxuan", 1.4),
    ("Zihao", 1.2),
    ("Gang", 1.1),
    ("Long", 1.0),
)

# (city, weight, store-code prefix, number of stores)
CITIES: Final[tuple[tuple[str, float, str, int], ...]] = (
    ("Shanghai", 0.18, "SH", 8),
    ("Beijing", 0.15, "BJ", 7),
    ("Shenzhen", 0.11, "SZ", 5),
    ("Guangzhou", 0.10, "GZ", 5),
    ("Hangzhou", 0.09, "HZ", 4),
    ("Chengdu", 0.09, "CD", 4),
    ("Nanjing", 0.06, "NJ", 3),
    ("Wuhan", 0.06, "WH", 3),
    ("Chongqing", 0.05, "CQ", 3),
    ("Suzhou", 0.05, "SU", 2),
    ("Xian", 0.04, "XA", 2),
    ("Tianjin", 0.02, "TJ", 2),
)

# (IANA zone, weight, fixed UTC offset in hours). Offsets are fixed on purpose: daylight
# saving shifts London and Los Angeles by an hour for half the year, which does not matter
# for the behaviour we simulate (when in the day people shop).
TIMEZONES: Final[tuple[tuple[str, float, int], ...]] = (
    ("Asia/Shanghai", 0.95, 8),
    ("Asia/Hong_Kong", 0.02, 8),
    ("Europe/London", 0.015, 0),
    ("America/Los_Angeles", 0.015, -8),
)

TIERS: Final[tuple[str, ...]] = ("bronze", "silver", "gold", "platinum")

# Tea drinks first, cosmetics after; (category, share of customers preferring it).
CATEGORIES: Final[tuple[tuple[str, float], ...]] = (
    ("milk_tea", 0.22),
    ("fruit_tea", 0.20),
    ("pure_tea", 0.10),
    ("skincare", 0.22),
    ("makeup", 0.16),
    ("fragrance", 0.10),
)
TEA_CATEGORIES: Final[int] = 3  # the first three categories are tea drinks

# (category index, price range in CNY) — eight products per category.
PRICE_RANGES: Final[tuple[tuple[float, float], ...]] = (
    (16.0, 28.0),
    (18.0, 32.0),
    (12.0, 68.0),
    (129.0, 699.0),
    (79.0, 399.0),
    (299.0, 899.0),
)
PRODUCTS_PER_CATEGORY: Final[int] = 8
PRODUCT_PREFIX: Final[tuple[str, ...]] = ("MT", "FT", "PT", "SK", "MU", "FR")

# Email providers. A user name is not an identity: li.wei8@qq.com and li.wei8@163.com are
# usually two different people.
PROVIDERS: Final[tuple[str, ...]] = (
    "qq.com",
    "163.com",
    "126.com",
    "gmail.com",
    "outlook.com",
    "sina.com",
)
# Typos a CRM clerk makes in each provider's domain (same order as PROVIDERS).
PROVIDER_TYPOS: Final[tuple[str, ...]] = (
    "qq.con",
    "163.cm",
    "126.con",
    "gmial.com",
    "outlok.com",
    "sina.cn",
)

# Mobile prefixes of the three carriers (134 and the 170/171 virtual ranges left out).
MOBILE_PREFIXES: Final[tuple[int, ...]] = (
    130,
    131,
    132,
    133,
    135,
    136,
    137,
    138,
    139,
    150,
    151,
    152,
    153,
    155,
    156,
    157,
    158,
    159,
    166,
    176,
    177,
    178,
    180,
    181,
    182,
    183,
    185,
    186,
    187,
    188,
    189,
    198,
    199,
)
# Store clerks' own phones use a prefix no customer gets, so a clerk phone never collides
# with a customer's real number.
CLERK_PHONE_PREFIX: Final[int] = 191
JUNK_PHONES: Final[tuple[str, ...]] = ("0", "13800000000")
JUNK_ANONYMOUS_IDS: Final[tuple[str, ...]] = ("undefined", "null", "0")
JUNK_EMAIL: Final[str] = "test@test.com"

WEB_USER_AGENTS: Final[tuple[str, ...]] = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/128.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; 23127PN0CC) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
)
APP_USER_AGENTS: Final[tuple[str, ...]] = (
    "TeaBeauty/5.3.1 (iPhone; iOS 17.5; Scale/3.00)",
    "TeaBeauty/5.3.1 (iPad; iOS 17.4; Scale/2.00)",
    "TeaBeauty/5.2.0 (Linux; Android 14; Xiaomi 23127PN0CC)",
    "TeaBeauty/5.3.1 (Linux; Android 13; HUAWEI NOH-AN00)",
    "TeaBeauty/5.1.4 (Linux; Android 12; OPPO PFJM10)",
)
WECHAT_USER_AGENTS: Final[tuple[str, ...]] = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.49(0x18003137) NetType/WIFI "
    "Language/zh_CN",
    "Mozilla/5.0 (Linux; Android 14; 23127PN0CC Build/UKQ1.230804.001; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/122.0.6261.120 Mobile Safari/537.36 XWEB/1220099 "
    "MMWEBSDK/20240301 MicroMessenger/8.0.48.2580(0x28003036) NetType/5G Language/zh_CN",
    "Mozilla/5.0 (Linux; Android 13; NOH-AN00 Build/HUAWEINOH-AN00; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/116.0.0.0 Mobile Safari/537.36 "
    "MicroMessenger/8.0.47.2560(0x28002F36) NetType/WIFI Language/zh_CN miniProgram",
)
ECOMMERCE_USER_AGENT: Final[str] = "teabeauty-shop/2.14 (order-service)"
CALLCENTER_USER_AGENT: Final[str] = "teabeauty-callcenter/4.2"
CALLCENTER_IP: Final[str] = "10.8.0.12"

# First octets of Chinese broadband (home) and mobile-carrier address ranges.
HOME_IP_OCTETS: Final[tuple[int, ...]] = (
    58,
    59,
    60,
    61,
    101,
    106,
    111,
    112,
    113,
    114,
    115,
    116,
    119,
    121,
    122,
    123,
    124,
    125,
    180,
    182,
    218,
    219,
    220,
    221,
    222,
)
MOBILE_IP_OCTETS: Final[tuple[int, ...]] = (39, 117, 120, 183, 223)

# (page name, path) for web and mini-program pages and app screens.
PAGES: Final[tuple[tuple[str, str], ...]] = (
    ("Home", "/"),
    ("Category", "/category"),
    ("Product", "/product"),
    ("Search", "/search"),
    ("Cart", "/cart"),
    ("Member Center", "/member"),
    ("Store Locator", "/stores"),
    ("Campaign", "/campaign"),
)
SEARCH_QUERIES: Final[tuple[str, ...]] = (
    "milk tea",
    "oolong",
    "jasmine tea",
    "cheese foam",
    "芝士奶盖",
    "杨枝甘露",
    "乌龙茶",
    "sunscreen",
    "lipstick",
    "serum",
    "面霜",
    "口红",
    "防晒",
    "香水",
    "精华液",
    "gift set",
)
SHARE_TARGETS: Final[tuple[str, ...]] = (
    "wechat_friend",
    "wechat_moments",
    "weibo",
    "xiaohongshu",
)
SIGNUP_METHODS: Final[tuple[str, ...]] = ("phone", "wechat", "email")
COMPLAINT_REASONS: Final[tuple[str, ...]] = (
    "late_delivery",
    "damaged_item",
    "wrong_item",
    "refund_request",
    "allergic_reaction",
    "coupon_not_applied",
    "membership_points",
)
# Why someone messaged without consent, or after opting out, rings the call centre.
MARKETING_COMPLAINT_REASON: Final = "unwanted_marketing"
# Coupon codes by occasion: 618 (June 1–18), Double 11 (Nov 1–11), and the rest of the year.
COUPON_618: Final[str] = "618-MJ30"
COUPON_DOUBLE11: Final[str] = "D11-MJ50"
COUPON_EVERYDAY: Final[tuple[str, ...]] = ("NEW10", "VIP20", "TEA5", "SPRING15")
