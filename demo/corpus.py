"""Synthetic support mail for the demo, tests and benchmarks: a folder-sorted history and an unsorted inbox.

The mail is made to be hard the way real support mail is (close categories sharing words, vague
subjects, replies quoting another topic, HTML, odd charsets, typos), so keywords alone do not solve it.
"""

from __future__ import annotations

import argparse
import html
import json
import random
import sys
import textwrap
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email import policy
from email.charset import BASE64, QP, Charset
from email.header import Header
from email.message import Message
from email.mime.application import MIMEApplication
from email.mime.image import MIMEImage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formataddr
from pathlib import Path

# label -> IMAP folder. Labels double as history sub-folder names, so they stay [a-z_].
CATEGORIES: dict[str, str] = {
    "billing": "Support/Billing",
    "refunds": "Support/Refunds",
    "login_problems": "Support/Login",
    "password_reset": "Support/PasswordReset",
    "bug_report": "Support/Bugs",
    "feature_request": "Support/FeatureRequests",
    "shipping_delay": "Support/Shipping",
    "order_cancellation": "Support/Cancellations",
    "account_deletion": "Support/AccountDeletion",
    "invoice_request": "Support/Invoices",
    "subscription_change": "Support/Subscriptions",
    "payment_failed": "Support/PaymentFailed",
    "technical_setup": "Support/Setup",
    "escalation_complaint": "Support/Complaints",
    "security_report": "Support/Security",
}

SUPPORT_ADDRESS = "support@example.com"
DEFAULT_START = datetime(2025, 1, 6, 8, 0, tzinfo=timezone.utc)
HISTORY_DAYS = 150  # history covers the first five months ...
INBOX_DAYS = 30  # ... and the inbox the sixth, so a time-ordered split never sees the future
LABELS_FILE = "inbox_labels.json"

# How often each kind of difficulty shows up (per message). Tuned so that a TF-IDF + logistic
# regression baseline trained on the history lands around 80-90% on the inbox, not 100%.
P_AMBIGUOUS = 0.05  # body about two categories; the label is one of them
P_QUOTED_REPLY = 0.4  # a reply quoting earlier mail, mostly about another category
P_FORWARD = 0.03
P_MENTION_OTHER = 0.3  # the customer's own text also names another category's issue
P_VAGUE_SUBJECT = 0.25
P_HTML_ONLY = 0.12
P_ALTERNATIVE = 0.18
P_ATTACHMENT = 0.05
P_SLOPPY = 0.18  # typos, lower case
P_FOREIGN_SUBJECT = 0.05
P_SHARED_DETAIL = 0.6  # a sentence from the neighbouring categories' shared pool

# Real inboxes are not balanced; the history is (one folder each, per_category mails).
_INBOX_WEIGHTS: dict[str, float] = {
    "billing": 1.2, "refunds": 1.1, "login_problems": 1.4, "password_reset": 1.2, "bug_report": 1.1,
    "feature_request": 0.6, "shipping_delay": 1.3, "order_cancellation": 0.8, "account_deletion": 0.5,
    "invoice_request": 0.8, "subscription_change": 0.8, "payment_failed": 0.9, "technical_setup": 1.0,
    "escalation_complaint": 0.6, "security_report": 0.4,
}


@dataclass(frozen=True)
class _Spec:
    """Everything a category can say. Slots in braces are filled per message."""

    subjects: tuple[str, ...]
    openers: tuple[str, ...]  # the sentence that says what the mail is about
    details: tuple[str, ...]  # specifics only this category uses
    asks: tuple[str, ...]
    groups: tuple[str, ...]  # neighbour groups whose shared sentences this category also uses
    topics: tuple[str, ...]  # how others refer to this issue ("my refund")
    agent: tuple[str, ...]  # what a support agent replies about it
    foreign: tuple[str, ...] = ()  # a few non-English subjects (non-ASCII charsets)


_SPECS: dict[str, _Spec] = {
    "billing": _Spec(
        subjects=("Question about my bill", "Charged twice?", "Unexpected charge of {amount}",
                  "Why was I charged {amount}?", "Billing question", "Strange charge on my statement",
                  "Charge from Lumo on {date}", "Wrong amount charged", "Price went up?",
                  "Billing issue - {email}", "What is this charge"),
        openers=("I noticed a charge of {amount} from Lumo on my card statement and I don't recognise it.",
                 "It looks like I was charged twice for {plan} this month.",
                 "My bank statement shows {amount} from Lumo on {date} but I thought my plan cost {amount2}.",
                 "Can you explain what the {amount} charge on {date} is for?",
                 "The price of my {plan} subscription seems to have gone up without any notice.",
                 "I was billed for {plan} even though I'm on the free tier.",
                 "There are two identical charges of {amount} on my credit card from {date}.",
                 "i dont understand my bill this month, it's way higher than usual",
                 "You charged me {amount} instead of the {amount2} that was advertised.",
                 "Why am I still being charged every month for a second camera I removed?",
                 "My statement has a Lumo charge I can't match to any order.",
                 "I cancelled my plan last month but you charged me again anyway.",
                 "Something is wrong with my payments, the amounts don't add up."),
        details=("The charge appears as LUMO*SUBSCR on my statement.",
                 "Last month it was {amount2}, now it's {amount}.",
                 "I only have one camera on the plan, not two.",
                 "Nobody else in my household has access to the card."),
        asks=("Could you check what happened and correct it?", "Please explain the charge.",
              "Can you look at my billing history and tell me what each charge is?",
              "If this is a mistake I'd like it corrected on the next bill.",
              "I'd like a breakdown of what I'm paying for.",
              "If you overcharged me I expect the difference back."),
        groups=("money",),
        topics=("the double charge on my card", "my bill", "the wrong charge"),
        agent=("I have checked your billing history and can see the charge of {amount} from {date}.",
               "The second charge was a temporary authorisation and will disappear within a few days."),
        foreign=("Facturation incorrecte ({amount})", "Doppelte Abbuchung – bitte prüfen"),
    ),
    "refunds": _Spec(
        subjects=("Refund request", "Requesting a refund for order {order}", "Money back please",
                  "Refund for {product}", "Where is my refund?", "Refund not received",
                  "Return and refund - {order}", "Reimbursement", "Still no refund"),
        openers=("I returned the {product} from order {order} on {date} and I'm still waiting for the refund.",
                 "I'd like a refund for my {plan} renewal of {amount}, I forgot to cancel before it renewed.",
                 "You promised a refund of {amount} {days} days ago and nothing has arrived on my card.",
                 "The {product} I received doesn't work and I want my money back.",
                 "Could you please refund the {amount} for order {order}? I sent it back with {carrier}.",
                 "I was told my refund was processed but my bank says nothing came in.",
                 "Please reimburse me for the {product}, it stopped working after {days} days.",
                 "I cancelled order {order} and was told I'd get my money back, but nothing yet.",
                 "I want to return the {product} for a full refund, it's within the 30 days.",
                 "I cancelled my subscription, please refund the last payment of {amount}.",
                 "The charge of {amount} on {date} was a mistake, I want it back."),
        details=("The return was signed for on {date}, tracking {tracking}.",
                 "Your returns page says refunds take 5 business days.",
                 "The item is unused and still in its box."),
        asks=("Please send the money back to the original payment method.",
              "How long does a refund usually take?", "Can you confirm the refund has been issued?",
              "I'd take store credit if that's faster.",
              "Please give me the refund reference so I can check with my bank."),
        groups=("money", "orders"),
        topics=("my refund", "the money you owe me", "getting my money back"),
        agent=("Your refund of {amount} has been approved and should reach your account in 5-10 business days.",
               "Once the returned {product} arrives at our warehouse we will issue the refund."),
        foreign=("Rückerstattung für Bestellung {order}", "Remboursement commande {order}"),
    ),
    "login_problems": _Spec(
        subjects=("Can't log in", "Login not working", "Unable to sign in to the app", "Locked out of my account",
                  "Sign-in error {error}", "Login loop", "2FA code not arriving", "Cannot access my account",
                  "App keeps logging me out"),
        openers=("I can't log in to the Lumo app on my {device}, it just says '{error}'.",
                 "Every time I sign in on {browser} I get sent straight back to the login page.",
                 "My account seems to be locked after a few failed sign-in attempts.",
                 "The two-factor code never arrives by SMS so I can't get into my account.",
                 "Since updating to version {version} the app logs me out and won't let me back in.",
                 "I know my password is correct but the login keeps failing with '{error}'.",
                 "Sign in with Google stopped working for my account {email}.",
                 "I can't access my account since yesterday, the app says the session is invalid.",
                 "I can't log in, do I need to reset my password or is something else wrong?",
                 "Someone told me to reset the app but I still can't get in."),
        details=("It works on my {device2} but not on my {device}.",
                 "I've already tried clearing the cache and reinstalling the app.",
                 "I changed phones last week, maybe that is related."),
        asks=("Can you unlock my account?", "Is there an outage on the sign-in servers?",
              "Please help me get back into my account.", "Can you check whether my account is blocked?"),
        groups=("access",),
        topics=("not being able to log in", "my locked account"),
        agent=("Please try signing out on all devices and then signing in again with {email}.",
               "I have unlocked your account; you should be able to sign in again now."),
        foreign=("Problème de connexion à mon compte", "Anmeldung funktioniert nicht"),
    ),
    "password_reset": _Spec(
        subjects=("Password reset", "Reset link not working", "Forgot my password",
                  "Password reset email never arrived", "Can't change password", "Reset link expired",
                  "New password not accepted", "Need a new password"),
        openers=("I forgot my password and the reset email never arrives, not even in spam.",
                 "The password reset link says it has expired even though I clicked it right away.",
                 "I requested a password reset three times but nothing arrived at {email}.",
                 "When I try to set a new password the page says '{error}'.",
                 "I'd like to change my password but I can't find the option in the app.",
                 "My new password isn't accepted, it says it doesn't meet the requirements but it does.",
                 "The reset link takes me to a blank page on {browser}.",
                 "I can't remember my password and the 'forgot password' button does nothing.",
                 "I can't log in because I forgot my password.",
                 "I need to get back into my account but I don't know the password any more."),
        details=("I checked the spam and promotions folders.",
                 "The email address on the account is {email}."),
        asks=("Can you send me a new reset link?", "Please reset my password manually.",
              "How do I change my password from the app?", "Could you tell me what the password rules are?"),
        groups=("access",),
        topics=("the password reset", "my password"),
        agent=("I have sent a new password reset link to {email}; it is valid for 24 hours.",),
        foreign=("Réinitialisation du mot de passe", "Passwort vergessen"),
    ),
    "bug_report": _Spec(
        subjects=("Bug: app crashes on {device}", "App crash when opening live view", "Bug report",
                  "Something is broken in {version}", "Live view freezes", "Error {error} in the app",
                  "Notifications not working since update", "Glitch in the dashboard", "App keeps crashing"),
        openers=("The app crashes every time I open the live view of my {product} on {device}.",
                 "Since version {version} the motion notifications arrive hours late or not at all.",
                 "The dashboard shows the wrong temperature from my {product}, it's stuck at the same value.",
                 "When I tap 'Export clip' the app freezes and I have to force close it.",
                 "There's a bug in the schedule screen: times are shown in the wrong time zone.",
                 "The web dashboard on {browser} shows '{error}' whenever I open the history tab.",
                 "My {product} goes offline every night around 2am and comes back an hour later.",
                 "Recorded clips play without sound since the last update.",
                 "After setup the {product} keeps disconnecting from the wifi.",
                 "My {product} is not working properly."),
        details=("Steps to reproduce: open the app, go to Devices, tap the {product}, wait a few seconds.",
                 "App version {version} on {os}.", "This started right after the last update.",
                 "Log excerpt: {error} at {module}", "Restarting the phone doesn't help."),
        asks=("Is this a known issue?", "Are you working on a fix?",
              "Let me know if you need logs or more details.", "Please pass this on to your developers."),
        groups=("product",),
        topics=("the app crashing", "the bug in the app"),
        agent=("Our engineers are aware of the crash in version {version} and a fix is planned.",
               "Could you send us the diagnostic log from Settings > Help > Send logs?"),
    ),
    "feature_request": _Spec(
        subjects=("Feature request", "Suggestion: {feature}", "Would love {feature}", "Idea for the app",
                  "Please add {feature}", "Any plans for {feature}?", "Wishlist", "Product feedback"),
        openers=("It would be great if the app supported {feature}.",
                 "Are there any plans to add {feature}? I'd use it every day.",
                 "Small suggestion: please add {feature} to the {product} settings.",
                 "I love the {product} but I really miss {feature}.",
                 "Could you consider adding {feature} in a future version?",
                 "Competitors already offer {feature}, any chance Lumo will too?",
                 "It's really annoying that there is no {feature}, is that planned?"),
        details=("At the moment I have to work around it with a second app.",
                 "Several people in the community forum asked for the same thing."),
        asks=("I'd happily test a beta.", "Thanks for considering it.",
              "Is there somewhere I can vote for features?", "Even a basic version would help a lot."),
        groups=("product",),
        topics=("my feature suggestion", "the feature I asked for"),
        agent=("I have passed your suggestion about {feature} to our product team.",),
    ),
    "shipping_delay": _Spec(
        subjects=("Where is my order?", "Order {order} not arrived", "Delivery delayed", "Package stuck in transit",
                  "Still waiting for my {product}", "Shipping status", "Tracking hasn't updated", "Late delivery"),
        openers=("I ordered a {product} on {date} (order {order}) and it still hasn't arrived.",
                 "The tracking number {tracking} hasn't updated for {days} days.",
                 "{carrier} says my package was delivered but there's nothing here.",
                 "Your website said delivery in 2-3 days, it has now been {days} days.",
                 "My order {order} has been 'in transit' with {carrier} for over a week.",
                 "The package is stuck in customs in {country}.",
                 "I still haven't received the {product} I paid for.",
                 "If the order doesn't arrive by Friday I want to cancel it."),
        details=("I've checked with my neighbours.", "The {carrier} website just says 'label created'."),
        asks=("Can you find out where it is?", "When can I expect it?", "Can you contact {carrier} for me?",
              "If it's lost, please send a replacement."),
        groups=("orders",),
        topics=("my missing order", "the delivery", "the package that never came"),
        agent=("Your order {order} is with {carrier} and the latest scan shows it is on its way.",),
        foreign=("Lieferung verspätet – Bestellung {order}", "Où est ma commande ?"),
    ),
    "order_cancellation": _Spec(
        subjects=("Cancel my order", "Please cancel order {order}", "Cancellation request", "Ordered by mistake",
                  "Stop my order", "Cancel before shipping", "Cancel order"),
        openers=("Please cancel order {order}, I placed it by mistake.",
                 "I'd like to cancel my order for the {product} before it ships.",
                 "I accidentally ordered two {product}s, please cancel one of them.",
                 "I found a better price elsewhere, can you cancel order {order}?",
                 "Can I still cancel the order I placed on {date}? It hasn't shipped yet.",
                 "Please don't send the {product}, I no longer need it.",
                 "Please cancel order {order} and refund my card.",
                 "Cancel the {product}, the delivery is taking far too long."),
        details=("The order confirmation says it ships in 2 days.",),
        asks=("Please confirm the cancellation by email.",
              "If it has already shipped, tell me how to refuse the delivery.",
              "I assume the money will go back to my card?", "Thanks for stopping it in time."),
        groups=("orders",),
        topics=("cancelling my order", "the order I cancelled"),
        agent=("Your order {order} has been cancelled and you will not be charged.",),
        foreign=("Stornierung Bestellung {order}", "Annulation de ma commande"),
    ),
    "account_deletion": _Spec(
        subjects=("Delete my account", "Account deletion request", "GDPR erasure request", "Please remove my data",
                  "Close my account", "Remove me", "Data deletion"),
        openers=("Please delete my Lumo account ({email}) and all the data associated with it.",
                 "Under GDPR article 17 I request the erasure of my personal data.",
                 "I no longer use your products, please close my account permanently.",
                 "How do I delete my account? I can't find the option in the app.",
                 "I want all my recordings and my account removed from your servers.",
                 "Please remove my account and stop sending me emails.",
                 "Please cancel my subscription and delete my account.",
                 "I want to close everything with Lumo, account and subscription."),
        details=("I have already removed the devices from the app.",),
        asks=("Please confirm once it's done.", "Make sure my card details are deleted too.",
              "How long until the data is gone from backups?", "I don't want any more marketing email."),
        groups=("access",),
        topics=("deleting my account", "my data deletion request"),
        agent=("Your account deletion request has been received and will be completed within 30 days.",),
        foreign=("Löschung meines Kontos", "Suppression de mon compte"),
    ),
    "invoice_request": _Spec(
        subjects=("Invoice request", "Need an invoice for order {order}", "VAT invoice please",
                  "Invoice for my subscription", "Missing invoice", "Receipt needed for expenses", "Company invoice"),
        openers=("Could you send me an invoice for order {order}? I need it for my expenses.",
                 "I need a VAT invoice with our company name, {company}, for the {plan} subscription.",
                 "I can't find the invoice for my {amount} payment on {date} in my account.",
                 "Please send me receipts for the last three months of my subscription.",
                 "Invoice {invoice} has the wrong billing address, can you reissue it?",
                 "Our accounting needs invoices addressed to {company} with our VAT number.",
                 "Where can I download my invoices in the app?",
                 "You charged me {amount} on {date}, can I get an invoice for that?",
                 "I need proof of payment for the {product} I bought."),
        details=("The billing address should be {company}, {city}.",),
        asks=("A PDF by email is fine.", "Please include our VAT number {vat}.",
              "Can invoices be emailed to me automatically from now on?",
              "Our finance team needs it by the end of the month."),
        groups=("money",),
        topics=("the invoice I asked for", "my invoices"),
        agent=("Please find invoice {invoice} for your order attached to this email.",),
        foreign=("Rechnung für Bestellung {order}", "Factura de la suscripción"),
    ),
    "subscription_change": _Spec(
        subjects=("Change my plan", "Upgrade to {plan}", "Downgrade subscription", "Switch to yearly billing",
                  "Subscription question", "Plan change", "Pause my subscription"),
        openers=("I'd like to upgrade from Basic to {plan}.",
                 "Please downgrade my subscription to the cheaper plan from next month.",
                 "Can I switch my {plan} subscription from monthly to yearly billing?",
                 "I want to add a second camera to my {plan} plan, what does that cost?",
                 "Is it possible to pause my subscription for {days} days while I'm travelling?",
                 "I'd like to stop my {plan} subscription from renewing but keep my account.",
                 "We moved to a smaller flat, so I only need the single-camera plan now.",
                 "Please cancel my {plan} subscription at the end of the billing period.",
                 "What would it cost to move to {plan}? The current plan is too expensive."),
        details=("I'm currently paying {amount} a month.",),
        asks=("Will the price difference be prorated?", "Please make the change from the next billing date.",
              "What happens to my recordings if I downgrade?", "Let me know what the new price will be."),
        groups=("money",),
        topics=("changing my plan", "my subscription change"),
        agent=("Your plan has been changed to {plan} from the next billing date.",),
    ),
    "payment_failed": _Spec(
        subjects=("Payment failed", "Card declined", "Payment not going through", "Problem paying for my order",
                  "Your payment was unsuccessful", "Checkout error", "Can't update my card"),
        openers=("I got an email saying my payment for {plan} failed, but my card is fine.",
                 "My card keeps getting declined at checkout with the message '{decline}'.",
                 "I tried to pay {amount} for the {product} three times and it fails every time.",
                 "The app says my subscription is suspended because a payment failed.",
                 "I updated my card details but the payment still doesn't go through.",
                 "PayPal payment fails at the last step of checkout.",
                 "My bank says they never saw the payment attempt, yet your site says declined.",
                 "You charged my card but the order page says the payment failed.",
                 "I have a problem with my payment for {plan}."),
        details=("The card has plenty of funds and works everywhere else.",),
        asks=("Can you retry the charge?", "Is there another way to pay?",
              "Please don't cancel my subscription while we sort this out.", "How do I update my payment method?"),
        groups=("money",),
        topics=("my failed payment", "the declined card"),
        agent=("Your last payment attempt was declined by your bank; please update your card in the app.",),
        foreign=("Zahlung fehlgeschlagen", "Échec du paiement"),
    ),
    "technical_setup": _Spec(
        subjects=("Setup help", "Can't connect {product} to wifi", "Installation question",
                  "How do I set up the {product}?", "Pairing problem", "Need help installing",
                  "Hub not found during setup"),
        openers=("I'm trying to set up my new {product} but it won't connect to my wifi.",
                 "During setup the app can't find the {product}, the light just keeps blinking blue.",
                 "How do I connect the {product} to the Lumo Hub?",
                 "The QR code pairing step fails on my {device}.",
                 "Does the {product} work with a 5 GHz network? Setup keeps failing.",
                 "I'm installing the {product} outside and need to know how to mount it and run the cable.",
                 "I moved my router and now need to reconnect all my devices, what's the easiest way?",
                 "The app crashes when I get to the wifi step of the setup.",
                 "My new {product} is not working, I can't get it going."),
        details=("My router is a {router}.", "The device is about 5 metres from the router."),
        asks=("Is there a step-by-step guide?", "Could someone walk me through the setup?",
              "Do I need to reset the device first?", "What ports need to be open on my router?"),
        groups=("product",),
        topics=("setting up my camera", "the installation"),
        agent=("Please hold the reset button for 10 seconds and start the setup again from the app.",),
    ),
    "escalation_complaint": _Spec(
        subjects=("Complaint", "Very disappointed", "Unacceptable service", "Third time writing!!!",
                  "I want to speak to a manager", "Formal complaint", "Terrible experience", "Nobody is answering"),
        openers=("This is the third time I'm writing about {topic} and nobody has answered.",
                 "I am extremely disappointed with how my case {ticket} about {topic} has been handled.",
                 "I want to file a formal complaint about your customer service.",
                 "Your support agent closed my ticket about {topic} without solving anything.",
                 "I've waited {days} days for a response about {topic}, this is unacceptable.",
                 "Please escalate this to a manager, I'm done talking to the chatbot.",
                 "If {topic} isn't resolved this week I'll dispute it with my bank and leave a review."),
        details=("I have been a loyal customer for years.", "My case number is {ticket}."),
        asks=("I expect a call from a supervisor.", "I want compensation for the time I've wasted.",
              "Please escalate this immediately.", "Give me a real answer this time."),
        groups=(),
        topics=("my complaint", "how I've been treated"),
        agent=("I'm sorry for your experience and I have escalated case {ticket} to my team lead.",),
    ),
    "security_report": _Spec(
        subjects=("Security issue", "Suspicious login on my account", "Possible vulnerability",
                  "Phishing email pretending to be Lumo", "Someone accessed my camera", "Security concern",
                  "Responsible disclosure"),
        openers=("I got an alert about a sign-in from {country} that wasn't me.",
                 "I think someone else has access to my camera, it moved on its own.",
                 "I received a phishing email pretending to be Lumo asking me to confirm my card.",
                 "I found a vulnerability in your web dashboard that exposes other users' device names.",
                 "There are devices in my account that I never added.",
                 "Your API puts session tokens in the URL, which ends up in proxy logs.",
                 "My password was changed without me doing anything.",
                 "I can't log in anymore and I think someone changed my password.",
                 "I got a password reset email I never asked for."),
        details=("I have screenshots of the alert.",),
        asks=("Please secure my account and tell me what was accessed.",
              "Do you have a bug bounty or a security contact?", "Can you log out all sessions?",
              "Please treat this as urgent."),
        groups=("access",),
        topics=("the suspicious login", "the security problem I reported"),
        agent=("We have signed out all sessions on your account and reset your password as a precaution.",),
    ),
}

# Sentences shared by neighbouring categories: the words that make them hard to tell apart.
_SHARED: dict[str, tuple[str, ...]] = {
    "money": ("My card ending in {last4} was charged {amount} on {date}.", "I'm on the {plan} plan.",
              "The account is under {email}.", "I pay monthly by card.",
              "The order number was {order} if that helps.", "This is about the payment for {plan}.",
              "Invoice {invoice} shows {amount}."),
    "orders": ("Order number: {order}.", "I paid {amount} including express shipping.",
               "Tracking: {tracking} ({carrier}).", "The delivery address is in {city}.",
               "I ordered it on {date}."),
    "access": ("My account email is {email}.", "I'm using {browser} on {os}.",
               "The app is version {version} on my {device}.", "I've had the account for years.",
               "I can't get into my account at all right now."),
    "product": ("I have the {product} and the Lumo app {version} on {device}.", "My router is a {router}.",
                "It's the {product} I bought in {month}.", "Firmware is up to date."),
}

_FILLERS = (
    "I've been a customer since {year}.", "Sorry if this is the wrong address.",
    "I tried calling but nobody picked up.", "Please get back to me as soon as you can.",
    "This is quite urgent for me.", "I looked in the help center but couldn't find an answer.",
    "Thanks for your help in advance.", "I tried the chat first but it didn't help.",
    "I'm writing from my work email.", "My {relative} set this up for me, so I'm not very technical.",
)

_MENTIONS = (
    "Last month you helped me with {topic}, thanks again for that.", "This is not about {topic}, that's sorted.",
    "I already wrote to you about {topic} but this is something else.",
    "Separately from {topic}, there's another thing.", "(My other email about {topic} can be ignored.)",
    "After all the trouble with {topic} I hoped things would be smooth now.",
)

_VAGUE_SUBJECTS = (
    "Help", "Question", "Re: your email", "Hello", "", "Urgent", "Problem", "Issue with my account",
    "Please help!!", "Lumo", "Support request", "Quick question", "Following up", "Hi", "Re: Ticket {ticket}",
    "Re: Your Lumo order", "Account", "Need assistance", "?",
)

_FIRST = ("Anna", "James", "Maria", "David", "Sarah", "Michael", "Laura", "Tom", "Emily", "Daniel", "Priya",
          "Wei", "Olga", "Kwame", "Fatima", "Liam", "Sophie", "Ahmed", "Hannah", "Lucas", "Mei", "Ravi",
          "José", "Zoë", "François", "Søren", "Björn", "Chloé", "Jürgen", "Renée", "Łukasz", "María",
          "Noémie", "Thérèse", "Andrés", "Ayşe", "Ingrid", "Marco", "Yuki", "Grace")
_LAST = ("Smith", "Johnson", "Nguyen", "Patel", "Okafor", "Tanaka", "Rossi", "Jensen", "O'Connor", "Brown",
         "Kim", "Schmidt", "Novak", "Silva", "Murphy", "Cohen", "Larsen", "Ivanova", "Walker", "Dubois",
         "Müller", "García", "Lefèvre", "Åkesson", "Wójcik", "Núñez", "Weiß", "Çelik", "Ó Briain",
         "Fernández")
_MAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com", "hotmail.co.uk", "icloud.com", "proton.me",
                 "web.de", "orange.fr", "gmx.net", "example.org", "fastmail.com")
_COMPANIES = ("Brightside Dental", "Kestrel Logistics GmbH", "Atelier Noël", "Hollow Oak Farm",
              "Meridian Accounting Ltd", "Café Zürich", "Northwind Traders", "Bluebird Nursery")
_PRODUCTS = ("Lumo Cam 2", "Lumo Hub", "Lumo Doorbell", "Lumo Sensor Kit", "Lumo Smart Plug", "Lumo Cam Outdoor",
             "Lumo Floodlight", "Lumo Thermostat", "camera", "doorbell")
_PLANS = ("Lumo Plus", "Lumo Plus Family", "Lumo Pro", "Basic", "Plus Annual", "Pro (yearly)")
_DEVICES = ("iPhone 13", "iPhone 15 Pro", "Pixel 7", "Samsung Galaxy S22", "iPad Air", "Galaxy Tab A8",
            "OnePlus 11", "Windows 11 laptop", "MacBook Air", "Moto G54")
_OSES = ("iOS 17.4", "iOS 18.1", "Android 14", "Android 13", "Windows 11", "macOS 14")
_BROWSERS = ("Chrome", "Firefox", "Safari", "Edge", "Brave")
_CARRIERS = ("UPS", "DHL", "FedEx", "USPS", "Royal Mail", "DPD", "Hermes", "La Poste")
_COUNTRIES = ("Brazil", "Vietnam", "Romania", "Canada", "Nigeria", "Germany", "India", "Russia", "the Netherlands")
_CITIES = ("Leeds", "Lyon", "München", "Porto", "Kraków", "Dublin", "Austin", "Malmö", "Gent", "Bologna")
_ERRORS = ("Something went wrong (E-403)", "ERR_CONN_TIMEOUT", "error 0x80040154", "code 1021",
           "Invalid session", "Unexpected error, please try again later", "401 Unauthorized", "E_TOKEN_EXPIRED",
           "Service unavailable", "Request failed (500)")
_DECLINES = ("Transaction declined (51)", "Your card was declined", "Payment could not be authorised",
             "do_not_honor", "3-D Secure authentication failed", "Something went wrong (E-402)")
_MODULES = ("LiveViewController.swift:212", "com.lumo.app.player.ExoWrapper", "sync/worker.js:88",
            "NotificationService.kt:45")
_FEATURES = ("dark mode", "a home screen widget", "export to CSV", "Apple HomeKit support",
             "multiple users per household", "a web version of the timeline", "custom notification sounds",
             "geofencing", "longer clip history", "Home Assistant integration", "temporary guest access",
             "activity zones", "a Windows app")
_ROUTERS = ("FritzBox 7590", "TP-Link Archer AX55", "Netgear Orbi", "BT Smart Hub 2", "Eero mesh", "Google Nest Wifi")
_RELATIVES = ("son", "daughter", "grandson", "niece", "husband", "wife")
_AGENTS = ("Megan", "Tobias", "Aisha", "Pedro", "Kirsten", "Sam")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")

_GREETINGS = ("Hi,", "Hello,", "Hi there,", "Dear Support Team,", "Hey", "Good morning,", "To whom it may concern,",
              "Hello Lumo team,", "Dear Sir or Madam,", "Hi support,", "Good afternoon,", "Hiya,")
_CLOSINGS = ("Thanks,", "Thank you,", "Best regards,", "Regards,", "Cheers,", "Kind regards,", "Thanks in advance,",
             "BR", "Best,", "Many thanks,", "Sincerely,")
_REPLY_LEADS = ("Thanks for getting back to me.", "Thanks, but I have another question.",
                "Following up on this.", "Sorry to bother you again.", "That one is sorted now, thank you.",
                "Unfortunately this still isn't resolved.", "Replying here because I couldn't find your other email.")
_DISCLAIMER = ("This e-mail and any attachments are confidential and intended solely for the addressee. "
               "If you have received it in error please notify the sender and delete it.")
_TZ_OFFSETS = (-8, -7, -5, -4, 0, 0, 1, 1, 1, 2, 2, 3, 5.5, 8, 9, 10)


@dataclass
class _Mail:
    """One message before rendering: text pieces, not yet MIME."""

    label: str
    subject: str
    paragraphs: list[str]
    sender: tuple[str, str]  # display name, address
    date: datetime
    closing: str = ""
    signature: str = ""
    quote_attribution: str = ""
    quote_lines: list[str] = field(default_factory=list)
    quote_style: str = "gmail"  # "gmail" (> prefixed) or "outlook" (original message block, not prefixed)
    reply_to_id: str = ""
    ambiguous: bool = False
    sloppy: bool = False


class _Generator:
    """Holds the seeded RNG so one seed always gives byte-identical files."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.counter = 0

    # ---- slots -----------------------------------------------------------------------------

    def _person(self) -> tuple[str, str, str]:
        rng = self.rng
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        ascii_first = _ascii(first).lower()
        ascii_last = _ascii(last).lower().replace("'", "").replace(" ", "")
        local = rng.choice((f"{ascii_first}.{ascii_last}", f"{ascii_first[0]}{ascii_last}",
                            f"{ascii_first}{rng.randint(1, 99)}", f"{ascii_first}_{ascii_last}{rng.randint(70, 99)}"))
        return first, f"{first} {last}", f"{local}@{rng.choice(_MAIL_DOMAINS)}"

    def _slots(self, when: datetime, email: str) -> dict[str, str]:
        rng = self.rng
        currency = rng.choice(("${:.2f}", "€{:.2f}", "£{:.2f}", "{:.2f} EUR", "USD {:.2f}"))
        prices = (4.99, 9.99, 12.99, 49.99, 59.0, 99.0, 129.0, 179.99, 19.98, 7.5, 239.0)
        amounts = [rng.choice(prices) for _ in range(2)]
        past = when - timedelta(days=rng.randint(1, 40))
        date = rng.choice((past.strftime("%B %d"), past.strftime("%d/%m/%Y"), past.strftime("%Y-%m-%d"),
                           past.strftime("%d %b"), "last week", "yesterday", past.strftime("%A")))
        return {
            "amount": currency.format(amounts[0]), "amount2": currency.format(amounts[1]),
            "date": date, "email": email, "plan": rng.choice(_PLANS), "product": rng.choice(_PRODUCTS),
            "order": rng.choice(("LM-{:06d}", "#{:07d}", "{:08d}", "LUMO{:06d}")).format(rng.randint(1000, 999_999)),
            "invoice": f"INV-{when.year}-{rng.randint(10000, 99999)}",
            "last4": f"{rng.randint(0, 9999):04d}", "carrier": rng.choice(_CARRIERS),
            "tracking": rng.choice(("1Z{:016d}", "JD{:018d}", "{:012d}")).format(rng.randint(0, 10**12)),
            "days": str(rng.randint(3, 21)), "version": f"{rng.randint(3, 5)}.{rng.randint(0, 14)}.{rng.randint(0, 9)}",
            "device": rng.choice(_DEVICES), "device2": rng.choice(_DEVICES), "os": rng.choice(_OSES),
            "browser": rng.choice(_BROWSERS), "error": rng.choice(_ERRORS), "decline": rng.choice(_DECLINES),
            "module": rng.choice(_MODULES),
            "company": rng.choice(_COMPANIES), "country": rng.choice(_COUNTRIES), "city": rng.choice(_CITIES),
            "feature": rng.choice(_FEATURES), "router": rng.choice(_ROUTERS),
            "ticket": f"#{rng.randint(100000, 999999)}",
            "vat": f"{rng.choice(('DE', 'FR', 'GB', 'NL'))}{rng.randint(10**8, 10**9 - 1)}",
            "year": str(rng.randint(2016, 2023)), "month": rng.choice(_MONTHS), "relative": rng.choice(_RELATIVES),
            "topic": "", "agent": rng.choice(_AGENTS),
        }

    # ---- text ------------------------------------------------------------------------------

    def _core(self, label: str, slots: dict[str, str], *, short: bool = False) -> list[str]:
        """Sentences that carry the category: opener, maybe details, shared context, an ask."""
        rng, spec = self.rng, _SPECS[label]
        if label == "escalation_complaint":
            other = rng.choice([c for c in _SPECS if c != label])
            slots["topic"] = rng.choice(_SPECS[other].topics)
            # A complaint names the underlying issue in that issue's own words, which is what makes it hard.
            sentences = [rng.choice(spec.openers), rng.choice(_SPECS[other].openers)]
        else:
            sentences = [rng.choice(spec.openers)]
        if not short:
            if spec.details and rng.random() < 0.55:
                sentences.append(rng.choice(spec.details))
            for group in spec.groups:
                if rng.random() < P_SHARED_DETAIL:
                    sentences.insert(rng.randint(0, len(sentences)), rng.choice(_SHARED[group]))
            if rng.random() < 0.35:
                sentences.insert(rng.randint(0, len(sentences)), rng.choice(_FILLERS))
        if rng.random() < 0.8:
            sentences.append(rng.choice(spec.asks))
        return [_fill(s, slots) for s in sentences]

    def _paragraphs(self, sentences: list[str]) -> list[str]:
        rng = self.rng
        if len(sentences) <= 2 or rng.random() < 0.4:
            return [" ".join(sentences)]
        cut = rng.randint(1, len(sentences) - 1)
        return [" ".join(sentences[:cut]), " ".join(sentences[cut:])]

    def _signature(self, full: str, first: str, slots: dict[str, str]) -> tuple[str, str]:
        rng = self.rng
        closing = rng.choice(_CLOSINGS) if rng.random() < 0.85 else ""
        name = rng.choice((first, full, full, first[0] if rng.random() < 0.1 else first))
        kind = rng.random()
        if kind < 0.15:
            sig = f"{full}\n{rng.choice(('Office manager', 'Owner', 'IT admin', 'Director'))}, {slots['company']}\n" \
                  f"Tel. +{rng.randint(30, 49)} {rng.randint(100, 999)} {rng.randint(100000, 999999)}"
            if rng.random() < 0.5:
                sig += "\n\n" + _DISCLAIMER
            return closing, sig
        if kind < 0.30:
            return closing, name + "\n\n" + rng.choice(("Sent from my iPhone", "Sent from my Galaxy",
                                                         "Get Outlook for Android", "Sent from Mail for Windows"))
        return closing, name

    def _compose(self, label: str, when: datetime, *, ambiguous_with: str | None = None) -> _Mail:
        rng = self.rng
        first, full, email = self._person()
        slots = self._slots(when, email)
        sentences = self._core(label, slots)
        if ambiguous_with:
            # Both halves in full, in random order: neither the text nor its shape gives the label away.
            second = self._core(ambiguous_with, slots)
            sentences = second + sentences if rng.random() < 0.5 else sentences + second
        elif rng.random() < P_MENTION_OTHER:
            # Real customers mention earlier, unrelated issues in the same mail; no quote trimming removes that.
            other = rng.choice([c for c in _SPECS if c != label])
            slots["topic"] = rng.choice(_SPECS[other].topics)
            mention = _fill(rng.choice(_MENTIONS), slots)
            sentences.insert(0 if rng.random() < 0.6 else len(sentences), mention)
        spec = _SPECS[label]
        roll = rng.random()
        if roll < P_VAGUE_SUBJECT or ambiguous_with:
            subject = _fill(rng.choice(_VAGUE_SUBJECTS), slots)
        elif roll < P_VAGUE_SUBJECT + P_FOREIGN_SUBJECT and spec.foreign:
            subject = _fill(rng.choice(spec.foreign), slots)
        else:
            subject = _fill(rng.choice(spec.subjects), slots)
        closing, signature = self._signature(full, first, slots)
        paragraphs = self._paragraphs(sentences)
        greeting = rng.choice(_GREETINGS) if rng.random() < 0.85 else ""
        if greeting:
            paragraphs.insert(0, greeting)
        mail = _Mail(label=label, subject=subject, paragraphs=paragraphs, sender=(full, email), date=when,
                     closing=closing, signature=signature, ambiguous=ambiguous_with is not None)
        if rng.random() < P_SLOPPY:
            mail.sloppy = True
            mail.paragraphs = [_typos(rng, p) for p in mail.paragraphs]
            if rng.random() < 0.3:
                mail.paragraphs = [p.lower() for p in mail.paragraphs]
                mail.subject = mail.subject.lower()
        roll = rng.random()
        if roll < P_QUOTED_REPLY:
            self._add_quote(mail, slots)
        elif roll < P_QUOTED_REPLY + P_FORWARD:
            self._add_forward(mail, slots)
        return mail

    def _add_quote(self, mail: _Mail, slots: dict[str, str]) -> None:
        """Make it a reply whose quoted part is (mostly) another category: trimming quotes matters."""
        rng = self.rng
        other = mail.label if rng.random() < 0.25 else rng.choice([c for c in _SPECS if c != mail.label])
        then = mail.date - timedelta(days=rng.randint(1, 20), minutes=rng.randint(0, 600))
        quoted_slots = dict(slots)
        old_subject = _fill(rng.choice(_SPECS[other].subjects), quoted_slots)
        if rng.random() < 0.5:
            # Replying to the agent: the quote is the agent's answer plus the customer's earlier mail.
            agent = slots["agent"]
            topic = rng.choice(_SPECS[other].topics).replace("my ", "your ").replace(" I ", " you ")
            lines = [f"Hi {mail.sender[0].split()[0]},", "",
                     f"Thank you for contacting Lumo Support about {topic}.",
                     _fill(rng.choice(_SPECS[other].agent), quoted_slots),
                     "Is there anything else I can help you with?", "", "Kind regards,", f"{agent}", "Lumo Support"]
            who_name, who_addr = "Lumo Support", SUPPORT_ADDRESS
            if rng.random() < 0.5:
                earlier = self._core(other, quoted_slots)
                lines += ["", f"On {format_datetime(then - timedelta(hours=5))}, {mail.sender[0]} wrote:"]
                lines += ["> " + line for line in _wrap(" ".join(earlier))]
        else:
            lines = _wrap(" ".join(self._core(other, quoted_slots)))
            who_name, who_addr = mail.sender
        mail.quote_lines = lines
        mail.quote_style = "outlook" if rng.random() < 0.25 else "gmail"
        if mail.quote_style == "gmail":
            mail.quote_attribution = f"On {then.strftime('%a, %b %d, %Y at %H:%M')}, {who_name} <{who_addr}> wrote:"
        else:
            to = mail.sender[1] if who_addr == SUPPORT_ADDRESS else SUPPORT_ADDRESS
            mail.quote_attribution = (f"-----Original Message-----\nFrom: {who_name} <{who_addr}>\n"
                                      f"Sent: {then.strftime('%A, %B %d, %Y %H:%M')}\nTo: {to}\n"
                                      f"Subject: {old_subject}\n")
        if rng.random() < 0.6 and not mail.subject.lower().startswith("re:"):
            # Keeping the old thread's subject is common and misleading, as in real support mail.
            mail.subject = "Re: " + (old_subject if rng.random() < 0.6 else mail.subject)
        if rng.random() < 0.5:
            mail.paragraphs.insert(1 if len(mail.paragraphs) > 1 else 0, rng.choice(_REPLY_LEADS))
        mail.reply_to_id = f"<{rng.getrandbits(64):016x}@mail.example.com>"

    def _add_forward(self, mail: _Mail, slots: dict[str, str]) -> None:
        rng = self.rng
        then = mail.date - timedelta(days=rng.randint(1, 60))
        body = _wrap(" ".join(self._core(mail.label, dict(slots), short=True)))
        mail.quote_style = "outlook"
        mail.quote_attribution = (f"---------- Forwarded message ---------\nFrom: {mail.sender[0]} <{mail.sender[1]}>\n"
                                  f"Date: {then.strftime('%a, %b %d, %Y')}\nSubject: {mail.subject}\nTo: {SUPPORT_ADDRESS}\n")
        mail.quote_lines = body
        mail.subject = "Fwd: " + mail.subject
        mail.paragraphs = mail.paragraphs[:1] + [rng.choice(("See below.", "Forwarding my earlier email, no answer yet.",
                                                             "Resending this as nobody replied."))]

    # ---- rendering -------------------------------------------------------------------------

    def _plain(self, mail: _Mail) -> str:
        wrap = self.rng.random() < 0.4
        blocks = []
        for p in mail.paragraphs:
            blocks.append("\n".join(_wrap(p)) if wrap else p)
        tail = "\n".join(x for x in (mail.closing, mail.signature) if x)
        if mail.signature and self.rng.random() < 0.3:
            tail = (mail.closing + "\n" if mail.closing else "") + "-- \n" + mail.signature
        text = "\n\n".join(blocks) + ("\n\n" + tail if tail else "")
        if mail.quote_lines:
            if mail.quote_style == "gmail":
                quoted = "\n".join((">" + " " + ln) if ln else ">" for ln in mail.quote_lines)
                quoted = quoted.replace("> > ", ">> ")
            else:
                quoted = "\n".join(mail.quote_lines)
            text += "\n\n" + mail.quote_attribution + "\n" + quoted
        return text + "\n"

    def _html(self, mail: _Mail) -> str:
        rng = self.rng
        paras = [html.escape(p) for p in mail.paragraphs]
        tail = "<br>".join(html.escape(x).replace("\n", "<br>") for x in (mail.closing, mail.signature) if x)
        quote = ""
        if mail.quote_lines:
            body = "<br>".join(html.escape(ln.removeprefix("> ")) for ln in mail.quote_lines)
            attribution = html.escape(mail.quote_attribution).replace("\n", "<br>")
            if mail.quote_style == "gmail":
                quote = (f'<div class="gmail_quote"><div class="gmail_attr">{attribution}</div>'
                         f'<blockquote class="gmail_quote" style="margin:0 0 0 .8ex;border-left:1px #ccc solid;'
                         f'padding-left:1ex">{body}</blockquote></div>')
            else:
                quote = f'<hr><div id="divRplyFwdMsg">{attribution}</div><div>{body}</div>'
        if rng.random() < 0.5:
            inner = "".join(f"<div>{p}</div><div><br></div>" for p in paras)
            return f'<div dir="ltr">{inner}<div>{tail}</div></div>{quote}\n'
        inner = "".join(f'<p class="MsoNormal">{p}<o:p></o:p></p>' for p in paras)
        return ("<html><head><meta http-equiv=\"Content-Type\" content=\"text/html; charset=utf-8\">"
                "<style>p.MsoNormal{margin:0cm;font-size:11pt;font-family:Calibri,sans-serif}</style></head>"
                f'<body lang="EN-GB"><div class="WordSection1">{inner}<p class="MsoNormal">{tail}</p>'
                f"{quote}</div></body></html>\n")

    def render(self, mail: _Mail) -> bytes:
        rng = self.rng
        self.counter += 1
        roll = rng.random()
        if roll < P_HTML_ONLY:
            texts = [("html", self._html(mail))]
        elif roll < P_HTML_ONLY + P_ALTERNATIVE:
            texts = [("plain", self._plain(mail)), ("html", self._html(mail))]
        else:
            texts = [("plain", self._plain(mail))]
        charset = _charset(rng, " ".join([mail.subject, *(t for _, t in texts)]))
        cte = _cte(rng, charset)
        # The HTML's own <meta> names the charset the part is really sent in.
        texts = [(st, t.replace('charset=utf-8"', f'charset={charset}"')) for st, t in texts]
        msg: Message
        if len(texts) == 1:
            msg = _text_part(texts[0][1], texts[0][0], charset, cte)
        else:
            msg = MIMEMultipart("alternative", boundary=self._boundary())
            for subtype, text in texts:
                msg.attach(_text_part(text, subtype, charset, cte, inner=True))
        if rng.random() < P_ATTACHMENT:
            body, msg = msg, MIMEMultipart("mixed", boundary=self._boundary())
            del body["MIME-Version"]
            msg.attach(body)
            msg.attach(self._attachment())

        name, addr = mail.sender
        # Headers go first, in the order mail clients write them; the MIME ones are moved after.
        mime = [(h, msg[h]) for h in ("MIME-Version", "Content-Type", "Content-Transfer-Encoding") if h in msg]
        for h, _ in mime:
            del msg[h]
        msg["From"] = formataddr((name, addr), charset="utf-8") if rng.random() < 0.9 else addr
        msg["To"] = SUPPORT_ADDRESS if rng.random() < 0.8 else f"Lumo Support <{SUPPORT_ADDRESS}>"
        if mail.subject.isascii():
            msg["Subject"] = mail.subject
        else:
            # Older clients encode headers in their own charset, not UTF-8.
            header_cs = charset if charset != "us-ascii" and _encodable(mail.subject, charset) else "utf-8"
            msg["Subject"] = Header(mail.subject, header_cs, header_name="Subject").encode(linesep="\r\n")
        msg["Date"] = format_datetime(mail.date)
        msg["Message-ID"] = f"<{self.seed}.{self.counter}.{rng.getrandbits(40):010x}@{addr.split('@')[1]}>"
        if mail.reply_to_id:
            msg["In-Reply-To"] = mail.reply_to_id
            msg["References"] = mail.reply_to_id
        if rng.random() < 0.3:
            msg["X-Mailer"] = rng.choice(("Microsoft Outlook 16.0", "Apple Mail (2.3774)", "Thunderbird 115.8.0"))
        for h, v in mime:
            msg[h] = v
        return msg.as_bytes(policy=_WIRE)

    def _boundary(self) -> str:
        # The library would draw a boundary from the global random module; ours keeps files reproducible.
        return f"=_{self.rng.getrandbits(64):016x}"

    def _attachment(self) -> Message:
        rng = self.rng
        kind = rng.randrange(3)
        part: Message
        if kind == 0:
            part = MIMEImage(b"\x89PNG\r\n\x1a\n" + rng.randbytes(64), "png")
            filename = "screenshot.png"
        elif kind == 1:
            part = MIMEApplication(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n%%EOF\n", "pdf")
            filename = "receipt.pdf"
        else:
            part = MIMEText("2025-01-01T00:00:00Z sync failed retry=3\n", "plain", "us-ascii")
            filename = "log.txt"
        del part["MIME-Version"]
        part.add_header("Content-Disposition", "attachment", filename=filename)
        return part


# compat32 and email.mime keep generation at thousands of messages a second (the modern header
# registry is ~20x slower); readers parse the result with policy.default all the same.
_WIRE = policy.compat32.clone(linesep="\r\n")


def _text_part(text: str, subtype: str, charset: str, cte: str | None, *, inner: bool = False) -> MIMEText:
    cs = Charset(charset)
    cs.body_encoding = {"quoted-printable": QP, "base64": BASE64, None: None}[cte]
    part = MIMEText(text, subtype, cs)
    if inner:
        del part["MIME-Version"]
    return part


def _charset(rng: random.Random, text: str) -> str:
    if text.isascii():
        return rng.choice(("us-ascii", "utf-8", "utf-8")) if rng.random() < 0.5 else "utf-8"
    if _encodable(text, "iso-8859-1") and rng.random() < 0.5:
        return "iso-8859-1"
    if _encodable(text, "windows-1252") and rng.random() < 0.2:
        return "windows-1252"
    return "utf-8"


def _cte(rng: random.Random, charset: str) -> str | None:
    roll = rng.random()
    if charset == "us-ascii":
        return None
    if roll < 0.25:
        return "quoted-printable"
    if roll < 0.35:
        return "base64"
    return None  # the library's choice: 7bit or 8bit


def _encodable(text: str, charset: str) -> bool:
    try:
        text.encode(charset)
    except UnicodeEncodeError:
        return False
    return True


_ASCII_FOLD = str.maketrans({"ł": "l", "Ł": "L", "ß": "ss", "ø": "o", "Ø": "O", "æ": "ae", "ı": "i"})


def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text.translate(_ASCII_FOLD)) \
        .encode("ascii", "ignore").decode()


def _fill(template: str, slots: dict[str, str]) -> str:
    return template.format_map(slots)


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, 72) or [""]


def _typos(rng: random.Random, text: str) -> str:
    """Swap, drop or double a letter in a few words, the way people type on phones."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        w = words[i]
        if len(w) < 4 or not w.isalpha():
            continue
        j = rng.randrange(1, len(w) - 1)
        kind = rng.random()
        if kind < 0.4:
            w = w[:j] + w[j + 1] + w[j] + w[j + 2:]
        elif kind < 0.7:
            w = w[:j] + w[j + 1:]
        else:
            w = w[:j] + w[j] + w[j:]
        words[i] = w
    out = " ".join(words)
    if rng.random() < 0.3:
        out = out.replace("I'm", "im").replace("don't", "dont").replace("can't", "cant")
    return out


def _spread(rng: random.Random, n: int, start: datetime, days: int) -> list[datetime]:
    """n send times within [start, start+days), in each sender's own time zone, sorted."""
    out = []
    for _ in range(n):
        day = rng.randrange(days)
        hour = rng.choice((7, 8, 9, 9, 10, 10, 11, 12, 13, 14, 14, 15, 16, 17, 19, 21, 23, 2))
        utc = start + timedelta(days=day, hours=hour, minutes=rng.randrange(60), seconds=rng.randrange(60))
        offset = rng.choice(_TZ_OFFSETS)
        out.append(utc.astimezone(timezone(timedelta(hours=offset))))
    return sorted(out)


def _clear(directory: Path) -> None:
    """Remove .eml files a previous run left, so a smaller corpus does not keep stale mail."""
    if directory.is_dir():
        for path in directory.rglob("*.eml"):
            path.unlink()


def generate(out_dir: Path, per_category: int = 80, inbox: int = 60, seed: int = 7,
             start: datetime = DEFAULT_START) -> dict[str, object]:
    """Write ``history/<label>/NNNN.eml``, ``inbox/NNNN.eml`` and ``inbox_labels.json`` under out_dir.

    Returns a summary: counts per split and label, and how many messages are HTML, replies or ambiguous.
    The same arguments always produce byte-identical files.
    """
    if per_category < 1 or inbox < 0:
        raise ValueError(f"per_category must be >= 1 and inbox >= 0, got per_category={per_category}, "
                         f"inbox={inbox}; pass e.g. per_category=80, inbox=60")
    if start.tzinfo is None:
        raise ValueError(f"start must be timezone-aware, got naive {start.isoformat()}; "
                         "pass e.g. datetime(2025, 1, 6, tzinfo=timezone.utc)")
    out_dir = Path(out_dir)
    gen = _Generator(seed)
    rng = gen.rng
    labels = list(CATEGORIES)
    stats = {"ambiguous": 0, "quoted": 0, "html": 0}
    t0 = time.perf_counter()

    def make(label: str, when: datetime) -> bytes:
        other = None
        if rng.random() < P_AMBIGUOUS:
            other = rng.choice([c for c in labels if c != label])
        mail = gen._compose(label, when, ambiguous_with=other)
        stats["ambiguous"] += mail.ambiguous
        stats["quoted"] += bool(mail.quote_lines)
        raw = gen.render(mail)
        stats["html"] += b"text/html" in raw
        return raw

    _clear(out_dir / "history")
    _clear(out_dir / "inbox")
    history_counts: dict[str, int] = {}
    for label in labels:
        folder = out_dir / "history" / label
        folder.mkdir(parents=True, exist_ok=True)
        for n, when in enumerate(_spread(rng, per_category, start, HISTORY_DAYS), 1):
            (folder / f"{n:04d}.eml").write_bytes(make(label, when))
        history_counts[label] = per_category

    inbox_dir = out_dir / "inbox"
    inbox_dir.mkdir(parents=True, exist_ok=True)
    weights = [_INBOX_WEIGHTS[label] for label in labels]
    inbox_labels: dict[str, str] = {}
    for n, when in enumerate(_spread(rng, inbox, start + timedelta(days=HISTORY_DAYS), INBOX_DAYS), 1):
        label = rng.choices(labels, weights)[0]
        name = f"{n:04d}.eml"
        (inbox_dir / name).write_bytes(make(label, when))
        inbox_labels[name] = label
    (out_dir / LABELS_FILE).write_text(json.dumps(inbox_labels, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    return {
        "out_dir": str(out_dir), "seed": seed, "history": sum(history_counts.values()), "inbox": len(inbox_labels),
        "categories": len(labels), "history_per_label": history_counts,
        "inbox_per_label": {label: list(inbox_labels.values()).count(label) for label in labels},
        **stats, "seconds": round(time.perf_counter() - t0, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write history/, inbox/ and inbox_labels.json into")
    parser.add_argument("--per-category", type=int, default=80, help="history messages per category (default 80)")
    parser.add_argument("--inbox", type=int, default=60, help="unsorted inbox messages (default 60)")
    parser.add_argument("--seed", type=int, default=7, help="same seed, same bytes (default 7)")
    args = parser.parse_args(argv)
    try:
        s = generate(args.out_dir, per_category=args.per_category, inbox=args.inbox, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {s['history']} history ({s['categories']} categories x {args.per_category}) and {s['inbox']} inbox "
          f"messages to {s['out_dir']} in {s['seconds']}s (seed {s['seed']}; {s['html']} HTML, {s['quoted']} quoted "
          f"replies, {s['ambiguous']} ambiguous)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
